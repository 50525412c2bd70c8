"""GLM inside vLLM: the out-of-tree model (`model`), its registration (`plugin`) and the engine
that drives it (`engine`). Importing this package does not import vLLM."""
