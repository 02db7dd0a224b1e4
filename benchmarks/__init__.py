"""Ratio benchmarks of msrl against the plain PyTorch / MONAI code a researcher would otherwise write.

`make bench` (`python -m benchmarks`) runs every pair in one process, A (msrl) and B (the
baseline) alternating over several repetitions after a warm-up, prints the table and writes
`benchmarks/results.json`; `benchmarks/RESULTS.md` keeps the latest tables and what they mean.
Modules: `settings` (sizes), `harness` (alternating timer, report), `pretraining` and `finetuning`
(the workloads), `memory` (peak memory in fresh processes), `backprop` (reward backpropagation's
seconds beside PPO's and its checkpointing memory), `gpu` (bf16 throughput, FLOP
utilisation), `sections` (what runs, and how to add a row), `run` (the command line).
"""
