"""The data pipeline: raw sources → clean → language/quality filters → dedup → mix → text and dialog shards.

Every part is a datatrove `PipelineStep`, so the same recipe runs on datatrove's local executor (default) or on
Slurm/Ray. `danlu.data.pipeline` builds and runs it; `danlu.stages.data` wires it into `danlu run`.
"""
