"""The megatron-core adapter: the parallel layout (the one reader of megatron-core's global state), the Llama-family
``GPTModel`` with a layout-invariant initialisation, the fused output layer, the CPU shim, the backend that
drives them through megatron-core's pipeline schedules, and ``compat``: the one module that knows how the supported
megatron-core releases differ."""
