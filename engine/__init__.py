"""vkae-tune's compact inference engine for Gemma 3 and Gemma 4 text decoders."""

ENGINE_VERSION = "0.1.0"
