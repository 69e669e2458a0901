"""A lean decode step with a preallocated KV cache, for the architectures RL fine-tunes most.

Why. A decode step of RL sampling runs the model on one new token per row. transformers' forward
does that through many small modules, a growing cache (``torch.cat`` of every layer's keys and
values at every step) and ``scaled_dot_product_attention``, whose CPU kernel is slow for a single
query: measured here (2 threads, 64 rows x 6 heads x 70 positions x 64) 0.32 ms a call in float32
and 1.86 ms in bfloat16, against 0.43 ms for the two matmuls below with bf16 inputs upcast. The
lean step computes the same function with a dozen tensor operations per layer, writing each
new key and value into a preallocated block of the cache (below).

What it computes, per layer, for the new token of every row (x: (R, E) hidden states):

    GPT-2     h = LN_1(x);  q, k, v = h W_qkv + b_qkv;  x += attn(q, k, v) W_o + b_o
              h = LN_2(x);  x += act(h W_fc + b_fc) W_proj + b_proj          (act: the config's)
    Llama     h = RMS_in(x);  q, k, v = h [W_q; W_k; W_v]^T (+ bias, Qwen2)
    (Qwen2,   q, k <- RoPE(q, k, position)  (the model's own rotary module: its cos and sin)
    Mistral)  x += attn(q, k, v) W_o^T;  h = RMS_post(x);  x += (silu(h W_g^T) * (h W_u^T)) W_d^T

    attn(q, k, v) = softmax(q K^T / sqrt(d) + mask) V   over the cache columns written so far,
                    each query head h reading key/value head h // (heads / kv_heads) (GQA)

then the final norm and the output head (tied to the input embedding or not). The attention's
arithmetic is float32 whatever the weights' dtype (bf16 attention is slower on CPU and rounds the
softmax), and so is the cache, except that with the native kernel a bf16 model's cache is bf16
(its keys and values come out of bf16 matmuls; the kernel widens them as it reads, half the
bytes); the matmuls with the weights run in the weights' dtype, as transformers' forward does.

The cache has two parts, each (layers, rows, kv heads, columns, head dim), in the order of
``cat(left-padded prompt, completion)``: a sealed part, contiguous for each layer, and an open block
that the next completion tokens are written into (``OPEN_COLUMNS`` = 16 columns, or a sixteenth of
the sealed ones when that is more); when the open block is full it is appended to the sealed part
(one copy of the cache). The first open block also holds the prompt's columns, so a call of at most
``OPEN_COLUMNS`` new tokens never seals and attends over one part.
Why two parts: a decode step's attention reads every row's cache, and torch's batched matmul over
the first n columns of a larger preallocated cache (a strided batch) ran 3x slower than over a
contiguous one (measured here, 2 threads, 64 rows x 6 heads x 41 columns x 64, six layers: 1.9 ms
against 0.58 ms for the scores). Attention is then two matmuls per part:

    scores = cat(q K_sealed^T, q K_open^T) / sqrt(d) + mask;  p = softmax(scores)
    attn   = p[:sealed] V_sealed + p[sealed:] V_open

With the native kernel (``ratiorl.rollout.native``, the engine's ``attention="auto"`` where it
builds) the same function over the same two parts is one C loop per query head instead: scores,
softmax and the weighted sum while the head's keys and values are in cache (8-13% of a
``generate`` call at the realistic benchmark shape).

The prompt's columns come from transformers' prefill (which knows every model's padding and
positions); ``mask`` is -inf on padding columns. Finished rows leave with ``keep(rows)`` (one
``index_select`` of each part).

With a PEFT LoRA model the step uses the merged weights W + B A s (computed once per call:
``current_layout``);
the prefill runs through the PEFT model itself. ``LeanDecoder.for_model(model)`` returns None for
any architecture or option it does not cover (then the engine keeps transformers' forward):
``ARCHITECTURES`` maps ``config.model_type`` to a layout, and each layout declares what it
supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratiorl._registry import Registry
from ratiorl.policy.models import is_fsdp_managed

ARCHITECTURES = Registry("lean decoder architecture")

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)  # a PEFT wrapper
    return get_base() if callable(get_base) else model


# Prepacked matmuls. oneDNN (mkldnn) can reorder a weight once into the blocked layout its kernels
# read, for a given number of rows; a decode step's few-row matmuls then run faster: measured here
# (2 threads, 64 rows, the 24 weights of a 6 x 384 GPT-2) 168 GFLOP/s in float32 against 113 with
# addmm, and 295 against 260 in bfloat16. Reordering costs about one read and write of the weight
# (0.5-2.5 G elements/s), paid once per call, so it is done when a call decodes at least
# PACK_MIN_WORK row-tokens.
PACK_MIN_WORK = 1024


def prepack(weight_out_in: torch.Tensor, rows: int):
    """oneDNN's prepacked copy of a (out, in) weight for ``rows``-row inputs, or None where oneDNN
    cannot (no mkldnn build, not on CPU, a dtype other than float32 / bfloat16)."""
    if weight_out_in.device.type != "cpu" or weight_out_in.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        if weight_out_in.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), rows)
    except (RuntimeError, AttributeError):  # an op this build lacks
        return None


class Linear:
    """``y = x W^T + b`` with W (out, in), through W's prepacked copy when ``pack_rows`` > 0 and
    oneDNN can; ``gelu_tanh`` fuses the tanh-approximated GELU into it (applied after otherwise)."""

    def __init__(self, weight_out_in, bias=None, pack_rows: int = 0, gelu_tanh: bool = False):
        self.weight, self.bias, self.gelu_tanh = weight_out_in, bias, gelu_tanh
        self.packed = prepack(weight_out_in, pack_rows) if pack_rows else None

    def __call__(self, x):
        if self.packed is not None:
            if self.gelu_tanh:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.gelu_tanh else y


def _weights(model) -> dict:
    """name -> tensor of the plain model, LoRA deltas merged (no copy without LoRA)."""
    from .engine import merged_state_dict  # noqa: PLC0415  (engine imports this module)

    return merged_state_dict(model)


class GPT2Layout:
    """transformers' GPT2LMHeadModel (Conv1D weights stored (in, out))."""

    @staticmethod
    def unsupported(cfg) -> str | None:
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            return "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn"
        if not getattr(cfg, "scale_attn_weights", True):
            return "scale_attn_weights=False"
        if getattr(cfg, "add_cross_attention", False):
            return "cross attention"
        if cfg.activation_function not in ACTIVATIONS:
            return f"activation {cfg.activation_function!r}"
        return None

    def __init__(self, model, cfg, pack_rows: int = 0):
        sd = _weights(model)
        self.L, self.heads, self.kv_heads = cfg.n_layer, cfg.n_head, cfg.n_head
        self.E = cfg.n_embd
        self.head_dim = self.E // self.heads
        self.eps, self.act = cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation_function]
        p = "transformer."
        self.wte, self.wpe = sd[p + "wte.weight"], sd[p + "wpe.weight"]
        self.head = Linear(sd.get("lm_head.weight", self.wte), None, pack_rows)
        self.ln_f = (sd[p + "ln_f.weight"], sd[p + "ln_f.bias"])
        tanh_gelu = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
        self.layers = []
        for i in range(self.L):
            w = {n: sd[f"{p}h.{i}.{n}"] for n in (
                "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")}

            def lin(name, **kw):  # Conv1D weights are stored (in, out)
                return Linear(w[name + ".weight"].t(), w[name + ".bias"], pack_rows, **kw)

            self.layers.append((w["ln_1.weight"], w["ln_1.bias"], lin("attn.c_attn"), lin("attn.c_proj"),
                                w["ln_2.weight"], w["ln_2.bias"], lin("mlp.c_fc", gelu_tanh=tanh_gelu),
                                lin("mlp.c_proj")))
        self.fused_act = tanh_gelu
        self.dtype = self.wte.dtype

    def embed(self, tok, pos):
        return self.wte[tok] + self.wpe[pos]

    def qkv(self, i, x, pos):
        ln_w, ln_b, qkv = self.layers[i][:3]
        return qkv(F.layer_norm(x, (self.E,), ln_w, ln_b, self.eps)).split(self.E, dim=-1)

    def after_attention(self, i, x, a):
        _, _, _, o, ln_w, ln_b, fc, proj = self.layers[i]
        x = x + o(a)
        h = fc(F.layer_norm(x, (self.E,), ln_w, ln_b, self.eps))  # the activation fused in when tanh-GELU
        return x + proj(h if self.fused_act else self.act(h))

    def logits(self, x):
        return self.head(F.layer_norm(x, (self.E,), *self.ln_f, self.eps))


def _rms_norm(x, w, eps):
    """transformers' LlamaRMSNorm: normalised in float32, cast back, times the weight."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LlamaLayout:
    """transformers' LlamaForCausalLM and its kin (Qwen2: biases on q, k, v; Mistral)."""

    @staticmethod
    def unsupported(cfg) -> str | None:
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return "pretraining_tp != 1"
        if getattr(cfg, "mlp_bias", False):
            return "mlp_bias"
        if getattr(cfg, "hidden_act", "silu") not in ACTIVATIONS:
            return f"activation {cfg.hidden_act!r}"
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and cfg.model_type == "mistral":
            return "sliding window attention"
        if getattr(cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
            return "layers other than full attention"
        return None

    def __init__(self, model, cfg, pack_rows: int = 0):
        sd = _weights(model)
        base = _base_model(model)
        self.rotary = base.model.rotary_emb  # the model's own cos / sin (any RoPE scaling it has)
        self.L, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps, self.act = cfg.rms_norm_eps, ACTIVATIONS[getattr(cfg, "hidden_act", "silu")]
        self.embed_tokens = sd["model.embed_tokens.weight"]
        self.head = Linear(sd.get("lm_head.weight", self.embed_tokens), None, pack_rows)
        self.norm = sd["model.norm.weight"]
        self.layers = []
        for i in range(self.L):  # separate q, k, v (gate, up) matmuls: fusing them would copy the weights
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."

            def lin(name):
                return Linear(sd[name + ".weight"], sd.get(name + ".bias"), pack_rows)

            self.layers.append((sd[p + "input_layernorm.weight"], lin(a + "q_proj"), lin(a + "k_proj"),
                                lin(a + "v_proj"), lin(a + "o_proj"), sd[p + "post_attention_layernorm.weight"],
                                lin(p + "mlp.gate_proj"), lin(p + "mlp.up_proj"), lin(p + "mlp.down_proj")))
        self.dtype = self.embed_tokens.dtype
        self._pos = None

    def embed(self, tok, pos):
        cos, sin = self.rotary(torch.empty(0, dtype=torch.float32, device=pos.device), pos[:, None])
        self._pos = (cos[:, :, None, :], sin[:, :, None, :])  # (R, 1, 1, D): float32, shared by all layers
        return self.embed_tokens[tok]

    def qkv(self, i, x, pos):
        ln_w, q_proj, k_proj, v_proj = self.layers[i][:4]
        h = _rms_norm(x, ln_w, self.eps)
        q, k, v = q_proj(h), k_proj(h), v_proj(h)
        cos, sin = self._pos
        R = x.shape[0]
        q = q.float().view(R, 1, self.heads, self.head_dim)
        k = k.float().view(R, 1, self.kv_heads, self.head_dim)
        q = (q * cos + _rotate_half(q) * sin).view(R, -1)
        k = (k * cos + _rotate_half(k) * sin).view(R, -1)
        return q, k, v

    def after_attention(self, i, x, a):
        o_proj, ln_w, gate, up, down = self.layers[i][4:]
        x = x + o_proj(a)
        h = _rms_norm(x, ln_w, self.eps)
        return x + down(self.act(gate(h)) * up(h))

    def logits(self, x):
        return self.head(_rms_norm(x, self.norm, self.eps))


for _name in ("gpt2",):
    ARCHITECTURES.register(_name)(GPT2Layout)
for _name in ("llama", "qwen2", "mistral"):
    ARCHITECTURES.register(_name)(LlamaLayout)


class LeanDecoder:
    """Decode steps of a supported model over a preallocated block KV cache (see the module docstring).

    ``start(cache, rows, prompt_mask, positions, max_new_tokens)`` takes the prefill's
    transformers cache (one row per distinct prompt, or per row), ``rows`` (row -> cache row),
    the rows' left-padded prompt mask (R, Tp) and each row's first completion position;
    ``step(tokens, t)`` feeds completion token t of the rows still in the batch and returns their
    next-token logits (rows, V) in the weights' dtype; ``keep(rows)`` keeps only those rows.
    """

    # columns of the open block: at least OPEN_COLUMNS, and 1/OPEN_FRACTION of the sealed columns
    # when that is more (a seal copies the whole cache, so long sequences seal less often): see the
    # module docstring
    OPEN_COLUMNS = 16
    OPEN_FRACTION = 16
    BF16_CACHE = True  # a bf16 model's cache in bf16 when the native kernel reads it (else float32)

    def __init__(self, model, layout_cls):
        self.model, self.layout_cls = model, layout_cls
        self.layout = None
        # the native kernel (``ratiorl.rollout.native.DecodeAttention``, set by the engine) or None:
        # torch's matmuls
        self.attention = None

    def current_layout(self, pack_rows: int = 0):
        """The layout over the model's weights as they are now (prepacked for ``pack_rows``-row
        inputs when > 0), built at every call: nothing cheaper tells whether the weights changed
        since the last one (torch's fused AdamW updates parameters without bumping their version
        counters), and a stale layout would sample from an old policy while logging its log-probs
        as the current one's. A LoRA model's merged weights are computed once per call."""
        self.layout = self.layout_cls(self.model, _base_model(self.model).config, pack_rows)
        return self.layout

    @classmethod
    def unsupported_reason(cls, model) -> str | None:
        cfg = getattr(_base_model(model), "config", None)
        if cfg is None:
            return "no transformers config"
        layout = ARCHITECTURES.get(getattr(cfg, "model_type", None))
        if layout is None:
            return f"no lean layout for model_type {getattr(cfg, 'model_type', None)!r}"
        if is_fsdp_managed(model):  # the decoder would read the weights outside FSDP's control
            return "parameters managed by FSDP"
        return layout.unsupported(cfg)

    @classmethod
    def for_model(cls, model) -> "LeanDecoder | None":
        """A decoder for ``model`` (a transformers causal LM or its PEFT wrapper), or None."""
        if cls.unsupported_reason(model) is not None:
            return None
        return cls(model, ARCHITECTURES[_base_model(model).config.model_type])

    @torch.no_grad()
    def start(self, cache, rows: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor,
              max_new_tokens: int) -> None:
        R, Tp = prompt_mask.shape
        lay = self.current_layout(R if R * max_new_tokens >= PACK_MIN_WORK else 0)
        dev = prompt_mask.device
        self.columns = Tp + max_new_tokens  # all the cache will hold
        empty = (lay.L, R, lay.kv_heads, 0, lay.head_dim)
        # a bf16 model's keys and values are bf16 matmul outputs (Llama's keys: rotated in float32 and
        # rounded, as transformers' bf16 forward rounds them): the native kernel reads them as bf16,
        # half the bytes; torch's matmuls read float32 (its bf16 batched matmuls are slower on CPU)
        bf16_cache = self.BF16_CACHE and self.attention is not None and lay.dtype == torch.bfloat16
        cache_dtype = torch.bfloat16 if bf16_cache else torch.float32
        self.K = torch.empty(empty, dtype=cache_dtype, device=dev)  # the sealed part: none yet
        self.V = torch.empty(empty, dtype=cache_dtype, device=dev)
        self._open_block(extra=Tp)  # the first open block holds the prompt's columns too
        for i in range(lay.L):
            k, v = _layer_kv(cache, i)
            self.K_open[i, :, :, :Tp] = k.index_select(0, rows)
            self.V_open[i, :, :, :Tp] = v.index_select(0, rows)
        self.open = Tp
        self.mask = torch.zeros((R, self.columns), dtype=torch.float32, device=dev)
        self.mask[:, :Tp].masked_fill_(prompt_mask == 0, float("-inf"))
        self.positions = positions.clone()
        self.Tp = Tp
        self.scale = lay.head_dim ** -0.5

    def _open_block(self, extra: int = 0) -> None:
        """A new open block after the sealed columns (and ``extra`` more columns): columns not sealed
        yet, each written before it is read."""
        sealed = self.K.shape[3]
        size = min(self.columns - sealed, extra + max(self.OPEN_COLUMNS, sealed // self.OPEN_FRACTION))
        shape = self.K.shape[:3] + (size,) + self.K.shape[4:]
        self.K_open = torch.empty(shape, dtype=self.K.dtype, device=self.K.device)
        self.V_open = torch.empty(shape, dtype=self.K.dtype, device=self.K.device)
        self.open = 0  # columns written in the open block

    def _seal(self) -> None:
        """Append the full open block to the sealed part (one copy of the cache)."""
        self.K = torch.cat([self.K, self.K_open], dim=3)
        self.V = torch.cat([self.V, self.V_open], dim=3)
        self._open_block()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        lay, R = self.layout, tokens.shape[0]
        if self.open == self.K_open.shape[3]:
            self._seal()
        sealed, c = self.K.shape[3], self.open  # completion token t goes to open column c
        if sealed + c != self.Tp + t:
            raise RuntimeError(f"LeanDecoder.step: token {t} out of order (cache holds {sealed + c} columns, "
                               f"expected {self.Tp + t})")
        n = sealed + c + 1
        pos = self.positions + t
        x = lay.embed(tokens, pos)
        group = lay.heads // lay.kv_heads
        mask = self.mask[:, None, None, :n]  # (R, 1, 1, n)
        for i in range(lay.L):
            q, k, v = lay.qkv(i, x, pos)
            self.K_open[i, :, :, c].copy_(k.view(R, lay.kv_heads, lay.head_dim))  # (cast to the cache's dtype)
            self.V_open[i, :, :, c].copy_(v.view(R, lay.kv_heads, lay.head_dim))
            if self.attention is not None:  # one pass over the cache: ratiorl.rollout.native
                q = q.float().reshape(R, lay.kv_heads, group, lay.head_dim).contiguous()
                a = self.attention.unchecked(q, self.K[i], self.V[i], sealed, self.K_open[i], self.V_open[i], c + 1,
                                             self.mask, self.scale)
                x = lay.after_attention(i, x, a.view(R, -1).to(lay.dtype))
                continue
            q = q.float().view(R, lay.kv_heads, group, lay.head_dim)
            k_open, v_open = self.K_open[i, :, :, :c + 1], self.V_open[i, :, :, :c + 1]
            scores = torch.matmul(q, k_open.transpose(-1, -2))
            if sealed:
                scores = torch.cat([torch.matmul(q, self.K[i].transpose(-1, -2)), scores], dim=-1)
            p = torch.softmax(scores.mul_(self.scale).add_(mask), dim=-1)  # (R, kv, group, n)
            a = torch.matmul(p[..., sealed:], v_open)
            if sealed:
                a = a.add_(torch.matmul(p[..., :sealed], self.V[i]))
            x = lay.after_attention(i, x, a.reshape(R, -1).to(lay.dtype))
        self.open = c + 1
        return lay.logits(x)

    @torch.no_grad()
    def keep(self, rows: torch.Tensor) -> None:
        for name in ("K", "V", "K_open", "V_open"):
            setattr(self, name, getattr(self, name).index_select(1, rows))
        self.mask, self.positions = self.mask.index_select(0, rows), self.positions.index_select(0, rows)

    def close(self) -> None:
        """Free the cache and the layout (the next call reads the weights again)."""
        self.K = self.V = self.K_open = self.V_open = self.mask = self.layout = None


def _layer_kv(cache, i):
    """Keys and values of layer ``i`` of a transformers cache (5.x ``layers``, or 4.x lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


__all__ = ["ARCHITECTURES", "LeanDecoder"]
