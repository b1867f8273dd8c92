"""One low-memory LoRA update of the forecaster, from windows to a gated adapter.

`loop` runs the update (micro-batches, gradient accumulation, plan changes,
peak RSS); `blocks` picks the blocks to adapt, `lora` adds and saves the
adapter, `optimizer` holds AdamW and the 8-bit payoff, `batches` the windows
and the replay mix, `gate` the validation gate. Nothing is imported here, so
`artifacts.adapters` can read the adapter file names without loading the training loop.
"""
