"""The student's machinery, shared by training, the teachers' SFT and the fine-tuning attack: the
forward pass (only the response logits), hooks on the residual stream, the fp32 master-weight
optimizer, LoRA, and the plain SFT loop."""
import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import data
import losses
import schedule


def cast_parameters(model, dtype):
    """Parameters to `dtype`, buffers kept: `model.to(bf16)` would also round the rotary
    frequencies (inv_freq), so a bf16 reference would not compute what the bf16 student computes."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


class NonFiniteError(ValueError):
    """A loss term or the gradient went NaN / inf: the run stops before the update is applied."""



class MasterWeightOptimizer:
    """AdamW / SGD on fp32 master copies of the trainable parameters; the model keeps a
    `compute_dtype` copy for forward and backward. bf16 weights alone would round away updates
    smaller than 2^-8 of a weight; the master copies keep them."""

    def __init__(self, model, *, compute_dtype, kind="adamw", lr=1e-5, weight_decay=0.0, state_device="same"):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.grads = [None] * len(self.params)  # fp32 sums of the micro-batches' gradients
        self.master = []
        for p in self.params:
            device = torch.device("cpu") if state_device == "cpu" else p.device
            separate = compute_dtype != torch.float32 or p.dtype != torch.float32 or device != p.device
            master = p.detach().to(device, torch.float32, copy=True) if separate else p
            self.master.append(master)
            p.data = p.data.to(compute_dtype)
        optimizer = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
        # fused: one kernel per tensor (CPU and CUDA) instead of a Python loop over tensors; sharded
        # parameters (--fsdp) have no fused SGD, so they take the foreach kernels
        fused = not (kind == "sgd" and any(isinstance(m, DTensor) for m in self.master))
        self.optimizer = optimizer(self.master, lr=lr, weight_decay=weight_decay, fused=fused, foreach=not fused)

    def accumulate(self, keep=None):
        """Add the gradients of the last backward to fp32 sums and clear them: bf16 `.grad`
        accumulating over micro-batches would round each sum. keep: per parameter None (all
        entries), False (none) or a bool mask of the entries that take this gradient."""
        for i, p in enumerate(self.params):
            g, p.grad = p.grad, None
            k = None if keep is None else keep[i]
            if g is None or k is False:
                continue
            if k is not None:
                g = torch.where(k, g, 0.0)
            if self.grads[i] is None:
                self.grads[i] = g.float()
            else:
                self.grads[i].add_(g)  # bf16 added into the fp32 sum: no fp32 copy of g

    def step(self, lr, clip, pinned=None):
        """pinned: per parameter, None or a bool mask of entries this step may not move: their
        gradient is zeroed, and their value and their optimizer state (Adam moments, SGD momentum)
        are restored after the step, so weight decay cannot move them and their moments do not
        decay as if they had seen a zero gradient. The shared step count still advances."""
        self.accumulate()  # gradients of a backward not yet collected
        for m, g in zip(self.master, self.grads):
            m.grad = None if g is None else g.to(m.device)
        self.grads = [None] * len(self.params)
        masks = {}
        for m, f in zip(self.master, pinned or []):
            if f is not None and m.grad is not None:  # no gradient: the optimizer leaves m alone
                # masks follow the model; masters may sit in CPU memory. Sharded (--fsdp): entries are
                # picked in this rank's part, which a DTensor cannot index by a mask
                masks[m] = local_part(f.to(m.device))
                local_part(m.grad)[masks[m]] = 0
        grads = [m for m in self.master if m.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded (--fsdp): the global norm
        if not math.isfinite(float(norm)):  # the weights are untouched: nothing non-finite is applied
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"the gradient norm is {float(norm)}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # parameters with pinned entries step one at a time, so the copies of their pinned values
        # and state (most of the model under focus) exist for one tensor at a time
        held = {m: m.grad for m in masks}
        for m in masks:
            m.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # each later step sees only its own parameter's gradient
        for m, f in masks.items():
            m.grad = held.pop(m)
            state = self.optimizer.state.get(m, {})
            values = local_part(m.detach())[f].clone()
            moments = {k: local_part(v)[f].clone() for k, v in state.items() if self._per_entry(k, v, m)}
            self.optimizer.step()
            m.grad = None
            with torch.no_grad():
                local_part(m)[f] = values
                for k, v in self.optimizer.state[m].items():
                    if self._per_entry(k, v, m):
                        # state created by this step starts at zero, as if these entries had none
                        local_part(v)[f] = moments[k] if k in moments else 0
            del values, moments
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the compute copies from the masters: one fused call where both share a device
            local = [(p, m) for m, p in zip(self.master, self.params) if m is not p and m.device == p.device]
            if local:
                torch._foreach_copy_([p for p, _ in local], [m for _, m in local])
            for m, p in zip(self.master, self.params):
                if m is not p and m.device != p.device:  # masters in CPU memory (--optim-state-device cpu)
                    p.copy_(m)
        return float(norm)

    @staticmethod
    def _per_entry(key, value, param):
        """Whether an optimizer state entry holds one value per parameter entry (moments, momentum)."""
        return key != "step" and torch.is_tensor(value) and value.shape == param.shape

    def master_state(self, model):
        """The model's state dict with the fp32 master weights in place of the compute copies."""
        state = model.state_dict()
        names = {id(p): n for n, p in model.named_parameters()}
        for m, p in zip(self.master, self.params):
            state[names[id(p)]] = m
        return state

    def load_master(self, model, state):
        names = {id(p): n for n, p in model.named_parameters()}
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                m.copy_(state[names[id(p)]])  # a sharded m (--fsdp) takes a state sharded like it
                if m is not p:
                    p.copy_(m)



def local_part(tensor):
    """This rank's part of a sharded tensor (writes reach the shard), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def enable_checkpointing(model):
    """Recompute activations in backward; transformers 5 renamed the method (the old name warns)."""
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()



class LoRALinear(torch.nn.Module):
    """y = W x + b + (α/r) · B A dropout(x), W and b frozen. A starts Kaiming-uniform (as nn.Linear's
    own init), B at zero, so the adapted model starts exactly equal to the base."""

    def __init__(self, base, r, alpha, dropout=0.0, generator=None):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def forward(self, x):
        return self.base(x) + self.scale * torch.nn.functional.linear(
            torch.nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)



def lora_linears(model, spec):
    """(name, Linear) of every layer named in the comma-separated --lora-targets `spec`."""
    targets = {t.strip() for t in spec.split(",") if t.strip()}
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        raise ValueError(f"--lora-targets: no Linear layer named {', '.join(sorted(targets))} in "
                         f"{type(model).__name__} (it has {', '.join(sorted(names))})")
    return found



LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"



def add_lora(model, *, r, dtype, alpha=None, targets=LORA_TARGETS, dropout=0.0, seed=0):
    """Freeze the model (cast to the compute dtype: no master copies are kept of frozen weights) and
    wrap every Linear named in `targets` in a LoRALinear of rank r (α default 2r: scale 2); only the
    adapters train. The same seed gives the same adapters."""
    if r < 1 or not 0 <= dropout < 1:
        raise ValueError("--lora-r must be ≥ 1 and --lora-dropout in [0, 1)")
    if "lm_head" in [t.strip() for t in targets.split(",")] and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("--lora-targets: lm_head is tied to the embeddings in this model; adapt other layers")
    found = lora_linears(model, targets)
    cast_parameters(model.requires_grad_(False), dtype)
    generator = torch.Generator(model.device).manual_seed(seed)
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                LoRALinear(module, r, 2.0 * r if alpha is None else alpha, dropout, generator))
    return len(found)



def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}



def student_state(model, opt, original=None):
    """What a checkpoint or student/ stores: the fp32 master weights; with LoRA, every adapted
    weight merged (W + α/r · B A in fp32) under the plain model's names, and the frozen weights taken
    from `original` (the fp32 base) when given, since the student holds them only in compute dtype."""
    state = opt.master_state(model)
    loras = lora_modules(model)
    if not loras:
        return state
    rename = {f"{n}.base.{s}": f"{n}.{s}" for n in loras for s in ("weight", "bias")}
    out = {rename.get(k, k): v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")}
    if original is not None:
        out = {k: original[k] if k in original else v for k, v in out.items()}
    for n, m in loras.items():
        w = out[n + ".weight"].float()
        out[n + ".weight"] = w + m.scale * (state[n + ".lora_B"].float() @ state[n + ".lora_A"].float()).to(w.device)
    return out



def adapter_state(model, opt):
    """The fp32 master values of the LoRA adapters, by parameter name: all that exact resume needs."""
    return {k: v for k, v in opt.master_state(model).items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}



def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: LAT / circuit breakers need a decoder with .model.layers")
    return layers



def residual_module(model, position):
    """The module whose output is residual-stream position `position`: 0 = the embeddings,
    l = block l (before the final norm). LAT writes and circuit breakers read at the same places."""
    return model.get_input_embeddings() if position == 0 else decoder_layers(model)[position - 1]



def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output



@contextlib.contextmanager
def hooks(pairs):
    """Forward hooks [(module, hook)] registered for the block, removed however it exits."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def residual_capture(model, positions):
    """Yields {position: [B, T, H] residual stream} filled by the next forward. Hooks registered here
    run after any `residual_perturbation` entered before, so a captured state includes δ: the
    stream the following block reads (one fixed rule, whatever hooks transformers installs)."""
    store = {}
    with hooks([(residual_module(model, l), lambda mod, inputs, output, l=l: store.__setitem__(l, _output_tensor(output)))
                for l in positions]):
        yield store


class Logits(NamedTuple):
    """A batch's logits for its last K positions and the labels aligned with them."""
    logits: torch.Tensor      # [B, K, V]
    labels: torch.Tensor      # [B, K]


class Captured(NamedTuple):
    """Logits as `Logits`, plus the residual stream at the captured positions (all positions)."""
    logits: torch.Tensor
    labels: torch.Tensor
    hidden: list              # [B, T, H] per captured position
    full_labels: torch.Tensor  # [B, T]
    real: torch.Tensor        # [B, T] bool, the non-padding tokens


def forward(model, feats, keep=None):
    """Logits of a left-padded batch for its last K positions only (K = longest response + 1).
    Losses read no prompt logits, and the vocabulary projection and its log-softmax are the largest
    tensors of a step; left padding puts every response at the end."""
    return Logits(*forward_captured(model, feats, (), keep)[:2])


def forward_captured(model, feats, positions, keep=None):
    """`forward` that also captures the residual stream at `positions` (see residual_module)."""
    batch = data.collate(feats, model.config.pad_token_id or 0, side="left")
    keep = keep or int(n_response(feats).max()) + 1
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    with residual_capture(model, positions) as hidden:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=keep, use_cache=False)
    labels = batch["labels"].to(device)
    return Captured(out.logits, labels[:, -keep:], [hidden[l] for l in positions], labels, mask.bool())


def n_response(feats):
    return torch.tensor([sum(t != data.IGNORE for t in f["labels"]) for f in feats], dtype=torch.float)



@torch.no_grad()
def sequence_logps_of(model, feats, micro_batch):
    """Sequence log-probs of many examples, in micro-batches."""
    out = []
    for part in tqdm(list(schedule.chunks(feats, micro_batch)), desc="log-probs", unit="batch", leave=False):
        logits, labels = forward(model, part)
        out.append(losses.sequence_logps(logits, labels).cpu())
    return torch.cat(out) if out else torch.zeros(0)



def sft_features(tokenizer, pairs, *, max_prompt_tokens=256, max_response_tokens=32, micro_tokens=0,
                 flag="--micro-tokens"):
    """sft's tokenised pairs and their lengths; a `micro_tokens` budget no example fits stops here,
    before any step, with an error naming `flag`."""
    feats = [data.encode(tokenizer, p, r, max_prompt_tokens, max_response_tokens) for p, r in pairs]
    lengths = [len(f["input_ids"]) for f in feats]
    if micro_tokens:
        schedule.micro_batches(range(len(feats)), lengths, 1, micro_tokens, flag)
    return feats, lengths



def sft(model, features, *, epochs, lr, batch_size, micro_batch=8, micro_tokens=0, seed=0, clip=1.0,
        optimizer="adamw", weight_decay=0.0, compute_dtype=torch.bfloat16, state_device="same",
        lr_schedule="cosine", warmup=None, after_step=None, desc="sft"):
    """Plain supervised fine-tuning on sft_features(...) = (features, lengths): mean NLL of the
    response tokens of each batch, the same optimizer and precision as the student, seeded shuffles.
    Builds the teachers and runs the fine-tuning attack (attack.py passes its lr schedule and
    `after_step(steps_done, model)`). Returns the model in eval mode."""
    feats, lengths = features
    opt = MasterWeightOptimizer(model, compute_dtype=compute_dtype, kind=optimizer, lr=lr, weight_decay=weight_decay,
                                state_device=state_device)
    steps = [batch for e in range(epochs)
             for batch in schedule.chunks(
                 np.random.default_rng([seed, data.Seed.SFT_SHUFFLE, e]).permutation(len(feats)).tolist(), batch_size)]
    warmup = min(2, len(steps) - 1) if warmup is None else warmup
    bar = tqdm(steps, desc=desc, leave=False)
    model.train()
    for t, batch in enumerate(bar):
        tokens = float(n_response([feats[i] for i in batch]).sum())
        total = 0.0
        for part in schedule.split_batch(batch, micro_batch, micro_tokens, lengths):
            logits, labels = forward(model, [feats[j] for j in part])
            loss = -losses.sequence_logps(logits, labels).sum() / tokens
            loss.backward()
            opt.accumulate()
            total += float(loss.detach())
        try:
            opt.step(schedule.lr_at(t, len(steps), lr, lr_schedule, warmup), clip)
        except NonFiniteError as e:
            raise NonFiniteError(f"{desc} step {t}: {e}") from None
        bar.set_postfix(nll=f"{total:.3f}")
        if after_step:
            after_step(t + 1, model)
    model.eval()
    return model
