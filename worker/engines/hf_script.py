"""The decoder layers of one decode step as a TorchScript function (used by ``hf._FastDecoder``).

The same math as ``_FastDecoder.forward`` with ``_PackedLinear`` weights, op
for op, so a token gets the same logits either way. It exists because the
TorchScript interpreter runs the ~1,000 ops of a step without the GIL: the
two lanes of a 2-core host then decode their halves of a batch truly in
parallel (8 streams: 22 ms a step instead of 29), and one stream saves the
Python dispatch (13 ms instead of 15).

No ``from __future__ import annotations`` here: TorchScript reads the annotations.
"""


import torch

# How _PackedLinear does a GEMM of many rows (``big``): none, oneDNN bfloat16, MKL float32.
BIG_NONE, BIG_BF16, BIG_FP32 = 0, 1, 2


def _linear(x: torch.Tensor, fp16: torch.Tensor, big_w: torch.Tensor, bias: torch.Tensor, has_bias: bool,
            big: int) -> torch.Tensor:
    if big == 1:  # BIG_BF16
        out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), big_w, None, "none", [], "").float()
        return out + bias if has_bias else out
    if big == 2:  # BIG_FP32
        return torch.nn.functional.linear(x, big_w, bias if has_bias else None)
    return torch.fbgemm_linear_fp16_weight(x, fp16, bias)


def decode_layers(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norms: list[torch.Tensor],  # per layer: input norm, post-attention norm
    fp16: list[torch.Tensor],  # per layer: qkv, o, gate_up, down (fbgemm-packed)
    big_w: list[torch.Tensor],  # the same four per layer for ``big`` (any tensors when big == BIG_NONE)
    biases: list[torch.Tensor],  # the same four per layer (zeros without bias)
    has_bias: bool,
    big: int,
    kc: list[torch.Tensor],
    vc: list[torch.Tensor],
    rows: torch.Tensor,
    pos: torch.Tensor,
    first: int,
    kv_len: int,
    mask3: torch.Tensor,
    dims: list[int],  # heads, kv heads, head dim, intermediate size, hidden size
    eps: float,
    scale: float,
) -> torch.Tensor:
    hq, kvh, d, inter, hidden = dims[0], dims[1], dims[2], dims[3], dims[4]
    n = x.shape[0]
    width = (hq + kvh) * d
    for i in range(len(kc)):
        j = 4 * i
        qkv = _linear(torch.rms_norm(x, [hidden], norms[2 * i], eps), fp16[j], big_w[j], biases[j], has_bias, big)
        qk = qkv[:, :width].view(n, hq + kvh, d)
        qk = torch.addcmul(qk * cos, torch.roll(qk, d // 2, -1), sin)
        kc[i][rows, :, pos] = qk[:, hq:]
        vc[i][rows, :, pos] = qkv[:, width:].view(n, kvh, d)
        keys = kc[i][first : first + n, :, :kv_len].reshape(n * kvh, kv_len, d)
        values = vc[i][first : first + n, :, :kv_len].reshape(n * kvh, kv_len, d)
        scores = torch.baddbmm(mask3, qk[:, :hq].reshape(n * kvh, hq // kvh, d), keys.transpose(1, 2), alpha=scale)
        attn = torch.bmm(torch.softmax(scores, -1), values).view(n, hq * d)
        x.add_(_linear(attn, fp16[j + 1], big_w[j + 1], biases[j + 1], has_bias, big))
        gu = _linear(torch.rms_norm(x, [hidden], norms[2 * i + 1], eps), fp16[j + 2], big_w[j + 2], biases[j + 2],
                     has_bias, big)
        act = torch.mul(torch.nn.functional.silu(gu[:, :inter], inplace=True), gu[:, inter:])
        x.add_(_linear(act, fp16[j + 3], big_w[j + 3], biases[j + 3], has_bias, big))
    return x


_scripted = None


def scripted_decode_layers():  # type: ignore[no-untyped-def]
    """``decode_layers`` compiled once per process (~1 s)."""
    global _scripted
    if _scripted is None:
        _scripted = torch.jit.script(decode_layers)
    return _scripted
