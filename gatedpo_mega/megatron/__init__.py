"""The megatron-core adapter: the parallel layout (the one reader of megatron-core's global state), the Llama-family
``GPTModel`` with a layout-invariant initialisation, the fused output layer, the CPU shim, and the backend that
drives them through megatron-core's pipeline schedules."""
