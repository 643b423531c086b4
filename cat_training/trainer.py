"""The CAT training loop in pure torch.

One step (per micro-batch):

    x_t = add_noise(x0, ε, t)                    one latent batch, timestep and noise for both terms
    L_diff = D( f_{θ+LoRA}(x_t, t, c),    target(x0, ε, t) )
    L_cat  = D( f_{θ+LoRA}(x_t, t, c_noT), sg f_θ(x_t, t, c_noT) )
    L      = L_diff + λ_cat · L_cat

D is the mean squared error in the model's native prediction space (ε for SD1.5, like the
original CAT code; v for v-prediction models). f_θ is the same model with every adapter bypassed,
evaluated under no_grad: there is no second copy of the model. Both adapter passes run as one
batch (the caption and the neutral caption side by side), which fills a GPU better than two
passes. λ_cat = 0 skips the CAT term entirely and is plain LoRA training.

Everything random (which images, timesteps, noise) comes from one seeded generator whose state is
part of the checkpoint (with the optimizer's and the loss scaler's), so a resumed run continues
exactly where it stopped.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .conditioning import cat as cat_conds
from .lora import AdapterSet

OPTIMIZERS = ("AdamW", "Adam", "SGD")
# the precision of the model's forward and backward passes; the adapter factors and the optimizer
# stay float32. float32 computes every layer in float32 (the caller makes the model upcast stored
# half-precision weights); bfloat16/float16 run under autocast; float16 also scales the loss
# (a GradScaler: float16 gradients underflow without it; bfloat16 has float32's range)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    steps: int = 900
    learning_rate: float = 1e-4
    optimizer: str = "AdamW"
    batch_size: int = 1
    grad_accumulation: int = 1
    lambda_cat: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    num_timesteps: int = 1000
    # run the caption and neutral-caption adapter passes as one batch (fills a GPU better, holds
    # both passes' activations); None: on for CUDA, off elsewhere. Off, each pass is
    # back-propagated before the next (peak memory of one pass) and the neutral pass has the base
    # pass's batch shape, so at step 0 (up = 0) the two agree bit for bit.
    fuse_passes: bool | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@dataclass
class StepLosses:
    step: int
    loss: float
    diffusion: float
    cat: float


@dataclass
class CATTrainer:
    adapters: AdapterSet
    predict: Callable  # (x_t, t, cond) -> native prediction
    add_noise: Callable  # (x0, noise, t) -> x_t
    target: Callable  # (x0, noise, t) -> native target
    latents: torch.Tensor  # (N, C, H, W)
    conds: torch.Tensor  # (N, L, D) caption conditioning (or a conditioning.Cond with y)
    neutral_conds: torch.Tensor | None  # (N, L, D) conditioning of the caption without the trigger
    config: TrainConfig
    device_type: str = "cpu"
    history: list = field(default_factory=list)

    def __post_init__(self):
        cfg = self.config
        if cfg.lambda_cat > 0 and self.neutral_conds is None:
            raise ValueError("lambda_cat > 0 needs the captions without the trigger")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.optimizer = make_optimizer(cfg.optimizer, self.adapters.parameters(), cfg.learning_rate)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=cfg.dtype == "float16")
        self.step_count = 0

    def _autocast(self):
        dt = DTYPES[self.config.dtype]
        if dt == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dt)

    def _backward(self, loss):
        self.scaler.scale(loss).backward()

    def _micro_batch(self):
        cfg, g = self.config, self.generator
        n = self.latents.shape[0]
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        t = torch.randint(cfg.num_timesteps, (cfg.batch_size,), generator=g)
        x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        return idx, t, x0, noise

    def step(self) -> StepLosses:
        cfg = self.config
        total = diff_sum = cat_sum = 0.0
        for _ in range(cfg.grad_accumulation):
            idx, t, x0, noise = self._micro_batch()
            x_t = self.add_noise(x0, noise, t)
            target = self.target(x0, noise, t)
            cond = self.conds[idx]
            acc = cfg.grad_accumulation
            fuse = cfg.fuse_passes if cfg.fuse_passes is not None else self.device_type == "cuda"
            if cfg.lambda_cat > 0 and fuse:
                # one batch for both adapter passes: more work per kernel launch, twice the activations
                neutral = self.neutral_conds[idx]
                with self._autocast():
                    with torch.no_grad(), self.adapters.bypassed():
                        base = self.predict(x_t, t, neutral).float()
                    both = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds([cond, neutral]))
                    pred, pred_neutral = both.float().chunk(2)
                    l_diff = torch.nn.functional.mse_loss(pred, target.float())
                    l_cat = torch.nn.functional.mse_loss(pred_neutral, base)
                    loss = l_diff + cfg.lambda_cat * l_cat
                self._backward(loss / acc)
            elif cfg.lambda_cat > 0:
                # two adapter passes, each back-propagated before the next: the gradients add up to
                # those of the summed loss while only one pass's activations are held at a time
                neutral = self.neutral_conds[idx]
                with self._autocast():
                    with torch.no_grad(), self.adapters.bypassed():  # transient, before any graph is held
                        base = self.predict(x_t, t, neutral).float()
                    l_diff = torch.nn.functional.mse_loss(self.predict(x_t, t, cond).float(), target.float())
                self._backward(l_diff / acc)
                with self._autocast():
                    l_cat = torch.nn.functional.mse_loss(self.predict(x_t, t, neutral).float(), base)
                self._backward(cfg.lambda_cat * l_cat / acc)
                loss = l_diff.detach() + cfg.lambda_cat * l_cat.detach()
            else:
                with self._autocast():
                    l_diff = torch.nn.functional.mse_loss(self.predict(x_t, t, cond).float(), target.float())
                    l_cat = torch.zeros(())
                    loss = l_diff
                self._backward(loss / acc)
            total += loss.item() / cfg.grad_accumulation
            diff_sum += l_diff.item() / cfg.grad_accumulation
            cat_sum += l_cat.item() / cfg.grad_accumulation
        self.scaler.step(self.optimizer)  # plain optimizer.step() unless float16 (then skips inf/NaN steps)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        rec = StepLosses(self.step_count, total, diff_sum, cat_sum)
        self.history.append(rec)
        return rec

    # -- checkpointing ------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        return {
            "adapters": self.adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "scaler": self.scaler.state_dict(),
            "step": self.step_count,
            "history": [asdict(h) for h in self.history],
            "config": self.config.as_dict(),
        }

    def load_state(self, state: dict):
        self.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.history = [StepLosses(**h) for h in state["history"]]


@dataclass
class TrainedLoRA:
    """A trained adapter set as the nodes pass it around: factors per layer (up already carries
    no scale; the file's alpha gives it), names, and the state needed to resume."""

    factors: dict  # model key -> (up (out, r), down (r, in_flat)) float32
    shapes: dict  # model key -> weight shape
    rank: int
    alpha: float
    stems: dict  # model key -> kohya LoRA key stem
    triggers: list
    lambda_cat: float
    steps: int
    base_sha256: str
    config: dict
    history: list  # StepLosses as dicts
    state: dict  # CATTrainer.state()

    def deltas(self) -> dict:
        scale = self.alpha / self.rank
        out = {}
        for k, (up, down) in self.factors.items():
            out[k] = (up @ down * scale).reshape(self.shapes[k])
        return out
