"""Quantisation, chapter 06: fewer bytes per weight (and per cached key/value).

    tinylm.quant.rtn        round to nearest: int8/int4 formats, 4-bit packing, QuantLinear
    tinylm.quant.formats    llama.cpp's Q8_0 / Q4_0 blocks, to relate our layout to GGUF files
    tinylm.quant.calibrate  calibration windows and GPTQ (beats round-to-nearest at 4 bits)
    tinylm.quant.model      whole models: schemes, quantize_model, bytes, save/load, int8 KV cache

Every public name is also importable from `tinylm.quant` itself.
"""

from tinylm.quant.calibrate import (
    calibration_windows,
    collect_hessians,
    gptq_quantize,
    gptq_quantize_model,
    layer_output_error,
)
from tinylm.quant.formats import (
    dequantize_q4_0,
    dequantize_q8_0,
    quantize_q4_0,
    quantize_q8_0,
    to_q4_0,
    to_q8_0,
)
from tinylm.quant.model import (
    SCHEMES,
    Int8KVCache,
    QuantScheme,
    get_scheme,
    int8_kv_bytes_per_token,
    load_quantized,
    model_nbytes,
    new_int8_cache,
    quantizable_linears,
    quantize_model,
    save_quantized,
    set_compute,
    set_kv_cache,
)
from tinylm.quant.rtn import (
    GRANULARITIES,
    QuantizedTensor,
    QuantLinear,
    check_format,
    compute_scale_zero,
    dequantize_codes,
    dequantize_tensor,
    group_view,
    int8_linear,
    pack_codes,
    pack_int4,
    qrange,
    quantize_codes,
    quantize_tensor,
    storage_layout,
    unpack_int4,
)

__all__ = [
    "GRANULARITIES",
    "SCHEMES",
    "Int8KVCache",
    "QuantLinear",
    "QuantScheme",
    "QuantizedTensor",
    "calibration_windows",
    "check_format",
    "collect_hessians",
    "compute_scale_zero",
    "dequantize_codes",
    "dequantize_q4_0",
    "dequantize_q8_0",
    "dequantize_tensor",
    "get_scheme",
    "gptq_quantize",
    "gptq_quantize_model",
    "group_view",
    "int8_kv_bytes_per_token",
    "int8_linear",
    "layer_output_error",
    "load_quantized",
    "model_nbytes",
    "new_int8_cache",
    "pack_codes",
    "pack_int4",
    "qrange",
    "quantizable_linears",
    "quantize_codes",
    "quantize_model",
    "quantize_q4_0",
    "quantize_q8_0",
    "quantize_tensor",
    "save_quantized",
    "set_compute",
    "set_kv_cache",
    "storage_layout",
    "to_q4_0",
    "to_q8_0",
    "unpack_int4",
]
