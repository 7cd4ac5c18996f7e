"""Data parallel training under torchrun: the process group, each rank's shard of a batch, and one
explicit all-reduce of the summed fp32 gradients per optimizer step; or, with --fsdp, the student's
parameters sharded over the ranks (FSDP2, torch's fully_shard), gradients reduce-scattered in backward."""
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


# rank 0 may spend long building teachers while the other ranks wait at a barrier
DIST_TIMEOUT = datetime.timedelta(hours=6)



def dist_setup():
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo for CPU tensors,
    NCCL for CUDA ones. A plain `python train.py` stays a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=DIST_TIMEOUT)



def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)



def is_main():
    return rank_and_world()[0] == 0



def shard(indices):
    """This rank's contiguous slice of a global batch (possibly empty). Contiguous, so when
    --micro-batch divides the slice the micro-batches are exactly those of one process."""
    rank, world = rank_and_world()
    return indices[rank * len(indices) // world:(rank + 1) * len(indices) // world]



def fsdp_wrap(model, layers, compute_dtype):
    """FSDP2: each decoder layer, then the rest, sharded over the ranks along dim 0. The shards stay
    fp32 (they are the master weights); each forward all-gathers a layer in compute_dtype, and
    backward reduce-scatters its gradients in fp32."""
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(opt):
    return any(isinstance(p, DTensor) for p in opt.params)


def grad_multiplier(opt):
    """FSDP averages the reduce-scattered gradients over ranks (gloo cannot be told to sum): each
    rank's loss, already its share of the global batch, is multiplied by the world size instead."""
    return dist.get_world_size() if is_sharded(opt) else 1


def max_over_ranks(n):
    if not dist.is_initialized():
        return n
    t = torch.tensor([n])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def whole(tensor):
    """A sharded tensor whole on its device (every rank takes part); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather(tensor):
    """A sharded tensor whole (every rank takes part), on the CPU; any other tensor as it is."""
    return whole(tensor).cpu() if isinstance(tensor, DTensor) else tensor


def is_dtensor(tensor):
    return isinstance(tensor, DTensor)


def rowwise(tensor, fn):
    """fn applied to each rank's rows of a tensor sharded along dim 0 (fn must act on rows alone), or to
    the whole tensor."""
    if not isinstance(tensor, DTensor):
        return fn(tensor)
    return DTensor.from_local(fn(tensor.to_local()), tensor.device_mesh, tensor.placements,
                              shape=tensor.shape, stride=tensor.stride())


def gather_state(state):
    return {k: gather(v) for k, v in state.items()}


def gather_optimizer_state(state_dict):
    """An optimizer state dict with every sharded entry whole: the one-process checkpoint format."""
    return {**state_dict, "state": {i: {k: gather(v) for k, v in s.items()} for i, s in state_dict["state"].items()}}


def shard_like(full, param):
    """This rank's part of a whole tensor, laid out as `param` (a sharded parameter), or `full` itself."""
    if not isinstance(param, DTensor):
        return full
    # every rank holds the same whole tensor: each keeps its part without a scatter from rank 0
    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                             src_data_rank=None)


def shard_optimizer_state(state_dict, params):
    """The inverse of gather_optimizer_state for the optimizer over `params` (its param_groups' order)."""
    out = {}
    for i, s in state_dict["state"].items():
        p = params[int(i)]
        out[i] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    return {**state_dict, "state": out}


def all_reduce_grads(opt):
    """Sum the fp32 gradient sums over ranks, once per optimizer step. Each rank's loss is already
    scaled by its share of the global batch (run_step divides by the whole side's totals), so the
    sum is the one-process gradient. Explicit rather than the DDP wrapper: the student is also run
    forward and backward outside the update (LAT's δ search, canary scores), which DDP would
    all-reduce, and the fp32 master copies live outside the module. A parameter no rank has a
    gradient for keeps None, so AdamW skips it as one process would."""
    if not dist.is_initialized() or is_sharded(opt):  # FSDP has reduce-scattered them in backward
        return
    opt.accumulate()
    has = torch.tensor([g is not None for g in opt.grads], dtype=torch.int32)
    dist.all_reduce(has)
    pending = []
    for i, (p, n) in enumerate(zip(opt.params, has.tolist())):
        if n:
            if opt.grads[i] is None:
                opt.grads[i] = torch.zeros(p.shape, device=p.device)
            pending.append(dist.all_reduce(opt.grads[i], async_op=True))
    for work in pending:
        work.wait()



def sum_over_ranks(totals):
    """Logged values (each already a share of the global batch) summed in rank order, so the
    metrics are the global batch's, as one process logs them."""
    if not dist.is_initialized():
        return totals
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, totals)
    out = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out



def main_first(phase):
    """Around work that writes shared files (teachers, answer caches, reference log-probs): the
    other ranks wait at phase 'before' until rank 0 reaches 'after', then redo the work, finding
    everything on disk. Without a shared disk each rank computes the same deterministic result."""
    if dist.is_initialized() and (phase == "before") != is_main():
        dist.barrier()


def from_main(value):
    """Rank 0's `value` on every rank (e.g. the precision rank 0 chose)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
