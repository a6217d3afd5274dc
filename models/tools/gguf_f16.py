"""Writes a 16-bit (F16) GGUF of a quantized one: every quantized matrix dequantized to F16,
the rest (norms, F32 tensors) and every metadata key as they are.

The benchmarks compare a quantized SmolLM2 against a 16-bit one (what `compare` is for), and
the only SmolLM2 reachable here is the Q4_1 file from PyPI; its dequantized weights make a
real F16 model of the same architecture and vocabulary (F16 holds every Q4_1 value to within
F16 rounding), with F16's cost per token, which is what the scoring benchmark measures.

Usage: models/python models/tools/gguf_f16.py IN.gguf OUT.gguf
"""

import sys

import numpy as np


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: gguf_f16.py IN.gguf OUT.gguf")
    src, dst = sys.argv[1], sys.argv[2]
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = GGUFWriter(dst, arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        if name == "general.file_type":
            writer.add_uint32(name, 1)  # LLAMA_FTYPE_MOSTLY_F16
        elif vtype == GGUFValueType.ARRAY:
            sub = f.types[1] if len(f.types) > 1 else GGUFValueType.INT32
            if sub == GGUFValueType.STRING:
                values = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
            else:
                values = [f.parts[i].tolist()[0] for i in f.data]
            writer.add_array(name, values)
        elif vtype == GGUFValueType.STRING:
            writer.add_string(name, bytes(f.parts[-1]).decode("utf-8", "surrogateescape"))
        else:
            writer.add_key_value(name, f.parts[-1].tolist()[0], vtype)
    keep = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    for t in reader.tensors:
        if t.tensor_type in keep:
            data = np.array(t.data)
        else:
            data = dequantize(t.data, t.tensor_type)
            # Norm vectors and other 1-D tensors stay F32, as llama.cpp's converter keeps them.
            data = data.astype(np.float16 if data.ndim > 1 else np.float32)
        writer.add_tensor(t.name, data, raw_dtype=None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
