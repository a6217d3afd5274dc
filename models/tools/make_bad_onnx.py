"""Writes the small, deliberately broken ONNX model folders the ONNX engine's tests load
(tests/data/onnx-bad/*). Run: models/python models/tools/make_bad_onnx.py"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "onnx-bad")


def tokenizer(n):
    vocab = {f"t{i}": i for i in range(n)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def model(vocab, logits_name="logits", present_ok=True, reshape=None, ids_name="input_ids",
          minus_inf_row=None):
    """input_ids -> logits via an embedding, with one KV pair that passes through.
    reshape: "empty" cuts the logits to no position, "batch2" doubles their batch.
    minus_inf_row: the token whose logits row (after it) is -inf everywhere."""
    table = np.eye(vocab, dtype=np.float32)
    if minus_inf_row is not None:
        table[minus_inf_row, :] = -np.inf
    emb = numpy_helper.from_array(table, "emb")
    inits = [emb]
    gathered = logits_name if reshape is None else "gathered"
    nodes = [helper.make_node("Gather", ["emb", ids_name], [gathered], axis=0)]
    if reshape == "empty":
        for name, v in [("zero", 0), ("axis1", 1)]:
            inits.append(numpy_helper.from_array(np.array([v], dtype=np.int64), name))
        nodes.append(helper.make_node("Slice", [gathered, "zero", "zero", "axis1"], [logits_name]))
    elif reshape == "batch2":
        nodes.append(helper.make_node("Concat", [gathered, gathered], [logits_name], axis=0))
    ins = [helper.make_tensor_value_info(ids_name, TensorProto.INT64, ["b", "s"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
           helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 1, "p", 2]),
           helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["b", 1, "p", 2])]
    outs = [helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["b", "s", vocab])]
    nodes.append(helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]))
    outs.append(helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["b", 1, "p", 2]))
    if present_ok:
        nodes.append(helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"]))
        outs.append(helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["b", 1, "p", 2]))
    g = helper.make_graph(nodes, "bad", ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="logitprobe-tests")
    m.ir_version = 9
    return m


def write(name, m, tk):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    onnx.save(m, os.path.join(d, "model.onnx"))
    tk.save(os.path.join(d, "tokenizer.json"))


write("no-logits", model(8, logits_name="scores"), tokenizer(8))
write("unpaired-kv", model(8, present_ok=False), tokenizer(8))
write("small-logits", model(4), tokenizer(10))
write("ok", model(8), tokenizer(8))
write("empty-logits", model(8, reshape="empty"), tokenizer(8))
write("batch2-logits", model(8, reshape="batch2"), tokenizer(8))
write("renamed-input", model(8, ids_name="tokens"), tokenizer(8))
write("minus-inf-row", model(8, minus_inf_row=3), tokenizer(8))
os.makedirs(os.path.join(OUT, "no-model"), exist_ok=True)
tokenizer(8).save(os.path.join(OUT, "no-model", "tokenizer.json"))
print(os.path.abspath(OUT))
