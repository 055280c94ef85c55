"""Make tests/data/ggml_quant_ref.npz: float rows and the blocks llama.cpp's own quantizer
makes of them, the oracle of tests/quant/test_ggml_quantize.py.

    ~/.cache/moetier-bench/llama-venv/bin/python scripts/make_ggml_quant_ref.py

Run it with the Python that has llama-cpp-python (the bench's build, 0.3.36): it calls
``ggml_quantize_chunk`` (ggml.h, no importance matrix: the reference quantizers
``quantize_row_*_ref`` that ``llama-quantize`` runs) in the ``libggml-base`` that package ships,
through ctypes. Imports numpy and llama_cpp only.

Inputs (seeded, stored in the file so the test does not depend on numpy's generators): rows of
512 values in several distributions (gaussian at two scales, heavy-tailed, all positive,
sparse, zeros, constant, bfloat16-rounded, one outlier per row).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "ggml_quant_ref.npz"
TYPES = {"Q8_0": 8, "Q5_0": 6, "Q5_1": 7, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # ggml type ids
ROW_BYTES = {"Q8_0": 34 * 16, "Q5_0": 22 * 16, "Q5_1": 24 * 16, "Q4_K": 144 * 2, "Q5_K": 176 * 2, "Q6_K": 210 * 2}


def inputs() -> np.ndarray:
    rng = np.random.default_rng(15)
    n = 512
    rows = [
        rng.standard_normal((4, n)),
        rng.standard_normal((4, n)) * 0.02,
        rng.standard_t(2, (4, n)),
        np.abs(rng.standard_normal((2, n))),
        rng.standard_normal((2, n)) * (rng.random((2, n)) < 0.05),
        np.zeros((1, n)),
        np.full((1, n), 0.5),
        (rng.standard_normal((4, n)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32),
    ]
    spikes = rng.standard_normal((2, n)) * 0.01
    spikes[:, 7] = 3.0
    rows.append(spikes)
    return np.concatenate([r.astype(np.float32) for r in rows])


def main() -> int:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(inputs())
    out = {"x": x}
    for name, tid in TYPES.items():
        dst = np.zeros((x.shape[0], ROW_BYTES[name]), dtype=np.uint8)
        n = lib.ggml_quantize_chunk(tid, x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == dst.nbytes, (name, n, dst.nbytes)
        out[name] = dst
    np.savez_compressed(OUT, **out, llama_cpp_python=np.array(llama_cpp.__version__))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with llama-cpp-python {llama_cpp.__version__}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
