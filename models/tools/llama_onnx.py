"""Builds llama-architecture decoder graphs in the two ONNX layouts logitprobe runs.

- optimum layout: standard ops only; inputs input_ids, attention_mask, position_ids,
  past_key_values.{i}.key|value; outputs logits, present.{i}.key|value.
- genai layout (onnxruntime-genai model builder): com.microsoft GroupQueryAttention, no
  position_ids input (positions come from the attention mask inside the op), the residual
  stream carried by (Skip)SimplifiedLayerNormalization as the builder writes it (the final
  norm keeps no sum), and KV dims named as the builder names them, the head size symbolic
  (['batch_size', kv_heads, 'past_sequence_length', 'kv_cache_dim']).

Weights come in llama.cpp's order: Q and K rows are stored for interleaved ("normal") RoPE,
rotating pairs (2i, 2i+1), exactly as llama.cpp applies it to a GGUF. The optimum graph
rotates those pairs; the genai graph un-permutes Q/K into Hugging Face's half-split order,
which GroupQueryAttention's non-interleaved rotary expects.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9


class Weights:
    """Per-layer weights as float32 numpy arrays, [out, in] for projections."""

    def __init__(self, embed, layers, norm, lm_head, cfg):
        self.embed = embed  # [vocab, hidden]
        self.layers = layers  # list of dicts: attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down
        self.norm = norm
        self.lm_head = lm_head  # [vocab, hidden]
        self.cfg = cfg  # hidden, n_heads, n_kv_heads, head_dim, rope_theta, rms_eps, vocab


def unpermute_rope(w, n_heads):
    """llama.cpp (interleaved pairs) row order -> Hugging Face (half split) row order."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


class G:
    def __init__(self, dtype=np.float32):
        self.nodes, self.inits, self.n = [], [], 0
        self.dtype = dtype

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def init(self, arr, p="w", dtype=None):
        nm = self.name(p)
        a = np.asarray(arr)
        if dtype is not None:
            a = a.astype(dtype)
        self.inits.append(numpy_helper.from_array(a, nm))
        return nm

    def const(self, arr, p="c"):
        return self.init(np.asarray(arr), p)

    def op(self, op, inputs, p=None, n_out=1, domain=None, **attrs):
        outs = [self.name(p or op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def rms_norm(g, x, w, eps):
    sq = g.op("Mul", [x, x])
    ms = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    d = g.op("Sqrt", [g.op("Add", [ms, g.const(np.array(eps, np.float32))])])
    return g.op("Mul", [g.op("Div", [x, d]), g.init(w, "norm")])


def linear(g, x, w):
    """x @ w.T with w [out, in] stored transposed as [in, out]."""
    return g.op("MatMul", [x, g.init(np.ascontiguousarray(w.T), "proj")])


def build(weights: Weights, layout: str, fp16: bool = False) -> onnx.ModelProto:
    c = weights.cfg
    H, KVH, D, hidden = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden"]
    vocab = weights.embed.shape[0]
    kv_type = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    g = G()
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    if layout == "optimum":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", kv_type, ["batch", "seq", vocab])]
    for i in range(len(weights.layers)):
        for kv in ("key", "value"):
            if layout == "optimum":
                past, present = ["batch", KVH, "past", D], ["batch", KVH, "total", D]
            else:
                past = ["batch_size", KVH, "past_sequence_length", "kv_cache_dim"]
                present = ["batch_size", KVH, "total_sequence_length", "kv_cache_dim"]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", kv_type, past))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", kv_type, present))

    x = g.op("Gather", [g.init(weights.embed, "embed"), "input_ids"], axis=0)  # [B,S,hidden]
    shape_bsx = g.op("Shape", ["input_ids"])  # [B, S]

    if layout == "optimum":
        # RoPE tables from position_ids: angles [B,S,D/2] -> [B,1,S,D/2]
        inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D))
        pos = g.op("Cast", ["position_ids"], to=TensorProto.FLOAT)
        ang = g.op("Mul", [g.op("Unsqueeze", [pos, g.const(np.array([-1], np.int64))]),
                           g.const(inv_freq.astype(np.float32).reshape(1, 1, -1))])
        ang = g.op("Unsqueeze", [ang, g.const(np.array([1], np.int64))])
        cos, sin = g.op("Cos", [ang]), g.op("Sin", [ang])
        # Additive mask [B,1,S,T]: key t visible to query s when mask[b,t] = 1 and t <= (T-S)+s.
        total = g.op("Shape", ["attention_mask"], start=1, end=2)
        seq = g.op("Shape", ["input_ids"], start=1, end=2)
        zero, one = g.const(np.array(0, np.int64)), g.const(np.array(1, np.int64))
        t_idx = g.op("Range", [zero, g.op("Squeeze", [total]), one])
        s_idx = g.op("Add", [g.op("Range", [zero, g.op("Squeeze", [seq]), one]),
                             g.op("Squeeze", [g.op("Sub", [total, seq])])])
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [t_idx, g.const(np.array([0], np.int64))]),
                                      g.op("Unsqueeze", [s_idx, g.const(np.array([1], np.int64))])])  # [S,T]
        padm = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const(np.array([1, 2], np.int64))])], to=TensorProto.BOOL)
        allowed = g.op("And", [causal, padm])  # [B,1,S,T]
        # A finite "minus infinity": fully masked rows (left padding) stay finite.
        add_mask = g.op("Where", [allowed, g.const(np.array(0.0, np.float32)), g.const(np.array(-1e9, np.float32))])
    else:
        mask_sum = g.op("ReduceSum", ["attention_mask", g.const(np.array([1], np.int64))], keepdims=1)
        seqlens = g.op("Cast", [g.op("Sub", [mask_sum, g.const(np.array([[1]], np.int64))])], to=TensorProto.INT32)
        seqlens_k = g.op("Reshape", [seqlens, g.const(np.array([-1], np.int64))])
        total_len = g.op("Cast", [g.op("Shape", ["attention_mask"], start=1, end=2)], to=TensorProto.INT32)
        total_len = g.op("Reshape", [total_len, g.const(np.array([], np.int64))])
        inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D))
        max_pos = c.get("max_position", 2048)
        ang = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
        cos_cache = g.init(np.cos(ang).astype(np.float16 if fp16 else np.float32), "cos_cache")
        sin_cache = g.init(np.sin(ang).astype(np.float16 if fp16 else np.float32), "sin_cache")

    heads_shape = lambda n: g.op("Concat", [shape_bsx, g.const(np.array([n, D], np.int64))], axis=0)

    def rope_interleaved(t):  # t [B,h,S,D], pairs (2i, 2i+1)
        shp = g.op("Shape", [t])
        pairs = g.op("Reshape", [t, g.op("Concat", [g.op("Shape", [t], end=3), g.const(np.array([D // 2, 2], np.int64))], axis=0)])
        ev, od = g.op("Split", [pairs, g.const(np.array([1, 1], np.int64))], n_out=2, axis=-1)
        ev = g.op("Squeeze", [ev, g.const(np.array([-1], np.int64))])
        od = g.op("Squeeze", [od, g.const(np.array([-1], np.int64))])
        re = g.op("Sub", [g.op("Mul", [ev, cos]), g.op("Mul", [od, sin])])
        ro = g.op("Add", [g.op("Mul", [ev, sin]), g.op("Mul", [od, cos])])
        st = g.op("Concat", [g.op("Unsqueeze", [re, g.const(np.array([-1], np.int64))]),
                             g.op("Unsqueeze", [ro, g.const(np.array([-1], np.int64))])], axis=-1)
        return g.op("Reshape", [st, shp])

    genai = layout == "genai"

    def skip_norm(branch, residual, w, final=False):
        """The builder's SkipSimplifiedLayerNormalization: RMSNorm(branch + residual) and,
        except for the final norm, the sum itself (output 3) as the next residual."""
        out = g.name("skipnorm")
        if final:
            outs = [out]
        else:
            outs = [out, "", "", g.name("residual")]
        g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [branch, residual, g.init(w, "norm")],
                                        outs, domain="com.microsoft", epsilon=float(c["rms_eps"])))
        return out, (None if final else outs[3])

    branch = None  # genai: the last block's output, not yet added to the stream
    for i, L in enumerate(weights.layers):
        if not genai:
            h = rms_norm(g, x, L["attn_norm"], c["rms_eps"])
        elif i == 0:
            h = g.op("SimplifiedLayerNormalization", [x, g.init(L["attn_norm"], "norm")], axis=-1,
                     epsilon=float(c["rms_eps"]), stash_type=1)
        else:
            h, x = skip_norm(branch, x, L["attn_norm"])
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        if layout == "optimum":
            def heads(t, n):
                return g.op("Transpose", [g.op("Reshape", [t, heads_shape(n)])], perm=[0, 2, 1, 3])
            q = rope_interleaved(heads(linear(g, h, L["wq"]), H))
            k = rope_interleaved(heads(linear(g, h, L["wk"]), KVH))
            v = heads(linear(g, h, L["wv"]), KVH)
            pk_in = g.op("Cast", [past_k], to=TensorProto.FLOAT) if fp16 else past_k
            pv_in = g.op("Cast", [past_v], to=TensorProto.FLOAT) if fp16 else past_v
            k_all = g.op("Concat", [pk_in, k], axis=2)
            v_all = g.op("Concat", [pv_in, v], axis=2)
            if fp16:
                g.nodes.append(helper.make_node("Cast", [k_all], [f"present.{i}.key"], to=TensorProto.FLOAT16))
                g.nodes.append(helper.make_node("Cast", [v_all], [f"present.{i}.value"], to=TensorProto.FLOAT16))
            else:
                g.nodes.append(helper.make_node("Identity", [k_all], [f"present.{i}.key"]))
                g.nodes.append(helper.make_node("Identity", [v_all], [f"present.{i}.value"]))
            rep = H // KVH
            if rep > 1:
                def repeat(t):
                    u = g.op("Unsqueeze", [t, g.const(np.array([2], np.int64))])  # [B,KVH,1,T,D]
                    shp = g.op("Shape", [u])
                    tgt = g.op("Mul", [shp, g.const(np.array([1, 1, rep, 1, 1], np.int64))])
                    e = g.op("Expand", [u, tgt])
                    s = g.op("Shape", [t])
                    new = g.op("Mul", [s, g.const(np.array([1, rep, 1, 1], np.int64))])
                    return g.op("Reshape", [e, new])
                k_all, v_all = repeat(k_all), repeat(v_all)
            scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]),
                                  g.const(np.array(1.0 / np.sqrt(D), np.float32))])
            probs = g.op("Softmax", [g.op("Add", [scores, add_mask])], axis=-1)
            attn = g.op("Transpose", [g.op("MatMul", [probs, v_all])], perm=[0, 2, 1, 3])
            attn = g.op("Reshape", [attn, g.op("Concat", [shape_bsx, g.const(np.array([H * D], np.int64))], axis=0)])
        else:
            wq = unpermute_rope(L["wq"], H)
            wk = unpermute_rope(L["wk"], KVH)
            cast = (lambda t: g.op("Cast", [t], to=TensorProto.FLOAT16)) if fp16 else (lambda t: t)
            q = cast(linear(g, h, wq))
            k = cast(linear(g, h, wk))
            v = cast(linear(g, h, L["wv"]))
            attn, pk, pv = g.op(
                "GroupQueryAttention",
                [q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache],
                n_out=3, domain="com.microsoft",
                num_heads=H, kv_num_heads=KVH, do_rotary=1, rotary_interleaved=0,
                scale=float(1.0 / np.sqrt(D)),
            )
            g.nodes.append(helper.make_node("Identity", [pk], [f"present.{i}.key"]))
            g.nodes.append(helper.make_node("Identity", [pv], [f"present.{i}.value"]))
            if fp16:
                attn = g.op("Cast", [attn], to=TensorProto.FLOAT)
        if genai:
            h, x = skip_norm(linear(g, attn, L["wo"]), x, L["ffn_norm"])
        else:
            x = g.op("Add", [x, linear(g, attn, L["wo"])])
            h = rms_norm(g, x, L["ffn_norm"], c["rms_eps"])
        gate = linear(g, h, L["w_gate"])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), linear(g, h, L["w_up"])])
        if genai:
            branch = linear(g, act, L["w_down"])
        else:
            x = g.op("Add", [x, linear(g, act, L["w_down"])])
    if genai:
        x, _ = skip_norm(branch, x, weights.norm, final=True)
    else:
        x = rms_norm(g, x, weights.norm, c["rms_eps"])
    logits = linear(g, x, weights.lm_head)
    g.nodes.append(helper.make_node("Cast" if fp16 else "Identity", [logits], ["logits"], **({"to": TensorProto.FLOAT16} if fp16 else {})))

    graph = helper.make_graph(g.nodes, f"llama_{layout}", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if layout == "genai":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="logitprobe")
    model.ir_version = IR_VERSION
    return model
