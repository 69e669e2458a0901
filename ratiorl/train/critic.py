"""A value model for PPO-style advantages (``gae``): a transformer backbone plus a scalar head.

The critic is a separate copy of the policy's base model (``AutoModel.from_pretrained`` of the
same checkpoint) with a zero-initialised linear head, so it starts by predicting 0 everywhere.
``values[i, t]`` is V(s_t), the value of the state *before* completion token t, read from the
hidden state at the same position the policy uses to predict token t.
"""

from __future__ import annotations

import torch
from torch import nn

from ratiorl.policy import position_ids_from_mask


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        for m in self.backbone.modules():  # RL runs without dropout (as the policy does)
            if isinstance(m, nn.Dropout):
                m.p = 0.0

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=None) -> "ValueModel":
        from transformers import AutoModel  # noqa: PLC0415

        kw = {} if dtype is None else {"dtype": dtype}
        backbone = AutoModel.from_pretrained(path, **kw)
        hidden = getattr(backbone.config, "hidden_size", None) or backbone.config.n_embd
        return cls(backbone, hidden).to(device)

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """(B, Tc) float32 values, 0 on padding."""
        Tp = prompt_ids.shape[1]
        input_ids = torch.cat([prompt_ids, completion_ids], 1)[:, :-1]
        attn = torch.cat([prompt_mask.long(), completion_mask.long()], 1)[:, :-1]
        out = self.backbone(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
        h = out.last_hidden_state[:, Tp - 1 :]
        return self.head(h).squeeze(-1).float() * completion_mask.float()


def value_loss(values, old_values, returns, mask, clip: float, num_tokens: float) -> torch.Tensor:
    """PPO clipped value loss, 0.5 * max((V - R)^2, (V_clip - R)^2), summed over tokens / num_tokens."""
    m = mask.float()
    err = (values - returns) ** 2
    if clip > 0:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return 0.5 * (err * m).sum() / max(float(num_tokens), 1.0)


class Critic:
    """The critic as an extra term of the update: a ``ValueModel``, its AdamW and the clipped value
    loss. The update stage calls ``zero_grad``, ``loss(micro_batch, num_tokens)`` and
    ``step(max_norm)`` of every such auxiliary term; checkpoints use ``state_dict``."""

    def __init__(self, model_path: str, device, critic_cfg):
        self.cfg = critic_cfg
        self.model = ValueModel.from_pretrained(model_path, device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=critic_cfg.lr)
        self.pretrained_steps = 0  # critic-only steps done by CriticPretraining

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self, mb, num_tokens: float) -> tuple:
        """``value_coef`` x the clipped value loss of a micro-batch (a trimmed ``Rollout``)."""
        values = self.model(mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask)
        vloss = value_loss(values, mb.values, mb.returns, mb.completion_mask, self.cfg.value_clip, num_tokens)
        return self.cfg.value_coef * vloss, {"value_loss": float(vloss.detach())}

    def step(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "pretrained_steps": self.pretrained_steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pretrained_steps = int(state.get("pretrained_steps", 0))


class CriticPretraining:
    """VAPO value pretraining (VAPO sec. 3.1; tutorial sec. 7.3): before the first policy update,
    ``steps`` critic-only steps, each on a fresh batch from ``draw(n_prompts)`` (sampled by the
    unchanged policy) with Monte Carlo returns (GAE lambda = 1) as targets. Called by the
    advantages stage with itself; does nothing once ``critic.pretrained_steps`` reaches ``steps``
    (so a resumed run does not pretrain again). Returns counters ``critic/pretrain_loss`` (last
    step's value loss) and ``critic/pretrain_steps``."""

    def __init__(self, critic: Critic, draw, n_prompts: int, steps: int, grad_accum: int = 1,
                 max_grad_norm: float = 1.0):
        self.critic, self.draw, self.n_prompts, self.steps = critic, draw, n_prompts, int(steps)
        self.grad_accum = max(1, int(grad_accum))
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")

    def __call__(self, stage) -> dict:
        if self.critic.pretrained_steps >= self.steps:
            return {}
        losses = []
        while self.critic.pretrained_steps < self.steps:
            batch = self.draw(self.n_prompts)
            batch.ref_logp = None  # Monte Carlo returns of the task reward alone
            batch.values, _, batch.returns, _ = stage.values_and_returns(batch, critic_lam=1.0)
            num_tokens = float(batch.completion_mask.sum())
            self.critic.zero_grad()
            total = 0.0
            with torch.enable_grad():
                for mb in batch.split_by_groups(self.grad_accum):
                    loss, m = self.critic.loss(mb.trim(), num_tokens)
                    loss.backward()
                    total += m["value_loss"] * len(mb) / len(batch)
            self.critic.step(self.max_norm)
            self.critic.pretrained_steps += 1
            losses.append(total)
        return {"critic/pretrain_loss": losses[-1], "critic/pretrain_steps": float(len(losses))}


class NLLLoss:
    """VAPO's positive-example language-model loss (VAPO eq. 10): ``coef`` x the token-mean negative
    log-likelihood of the sequences whose reward reaches ``threshold``,
    L = -1 / sum_{i correct} |y_i| * sum_{i correct} sum_t log pi_theta(y_it).
    An auxiliary term of the update on the POLICY's parameters (``uses_policy_logp``: the update
    stage passes the micro-batch's log-probs); ``begin(batch)`` takes the rollout-wide token count
    so split micro-batches sum to the un-split loss. No optimizer of its own."""

    uses_policy_logp = True

    def __init__(self, coef: float, threshold: float = 1.0):
        self.coef, self.threshold = float(coef), float(threshold)
        self.model = nn.Module()  # no parameters of its own (data-parallel gradient sync skips it)
        self.n_tokens, self.n_rows = 1.0, 1

    def begin(self, batch) -> None:
        sel = (batch.rewards >= self.threshold).float()
        self.n_tokens = max(float((batch.completion_mask.float() * sel[:, None]).sum()), 1.0)
        self.n_rows = int(batch.rewards.shape[0])

    def zero_grad(self) -> None:
        pass

    def loss(self, mb, num_tokens: float, logp=None) -> tuple:
        if logp is None:
            raise ValueError("NLLLoss needs the policy log-probs (the update passes them to uses_policy_logp terms)")
        sel = (mb.rewards >= self.threshold).to(logp.dtype)
        nll = -(logp * mb.completion_mask.to(logp.dtype) * sel[:, None]).sum() / self.n_tokens
        # metric scaled so the update's row-weighted mean over micro-batches is the whole batch's NLL
        return self.coef * nll, {"nll_loss": float(nll.detach()) * self.n_rows / max(int(mb.rewards.shape[0]), 1),
                                 "nll/correct_frac": float(sel.mean())}

    def step(self, max_norm: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
