"""Serving side of vkae-tune: `serve` (OpenAI-compatible HTTP server on our engine), `verify` (re-measure a
recipe on the hardware present) and `export` (launch commands for vLLM / SGLang)."""
