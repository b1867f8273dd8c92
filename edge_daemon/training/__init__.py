"""One low-memory LoRA update of the forecaster, from the store's windows to a committed adapter.

`job` is what a training worker runs for one update (or the base-model
bootstrap): `data` gathers the windows since the change plus replay, `start`
dry-runs the candidate plans, `trace` records memory and plan over the update.
`loop` runs the update (micro-batches, gradient accumulation, plan changes,
peak RSS); `blocks` picks the blocks to adapt, `lora` adds and saves the
adapter, `optimizer` holds AdamW and the 8-bit payoff, `batches` the windows
and the replay mix, `gate` the validation gate. Nothing is imported here, so
`artifacts.adapters` can read the adapter file names without loading the training loop.
"""
