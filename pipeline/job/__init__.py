"""The batch job on Ray Data, one module per step of the data flow:
config -> read -> prompts (policies) -> generate -> write (storage) -> manifest, run by `runner`."""
