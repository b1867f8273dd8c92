"""One low-memory LoRA update of the forecaster, from the store's windows to a committed adapter.

`job` is what a training worker runs for one update (or the base-model
bootstrap): `data` gathers the windows since the change plus replay, `start`
dry-runs the candidate plans, `trace` records memory and plan over the update.
`loop` runs the update (micro-batches, gradient accumulation, plan changes,
peak RSS) and returns its report (`records.UpdateReport`); `blocks` picks the
blocks to adapt, `lora` adds the adapter and saves it in peft's format
(`artifacts.peft_format`), `optimizer` holds AdamW (whether 8-bit state pays is
the planner's rule, `plan.EightBitPayoff`), `batches` the windows and the replay
mix, `gate` the validation gate, `refit` the baselines an accepted adapter serves
beside. Nothing is imported here.
"""
