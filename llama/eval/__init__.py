"""Evaluation on the Code Llama paper's benchmarks: `python -m llama.eval BENCHMARK`.

protocol.py is the protocol (prompts, stop strings, sampling, test programs); humaneval.py,
infilling.py, mbpp.py and perplexity.py load each benchmark and generate through the
public `Llama` API; execution.py and guard.py run each test program in a sandbox;
scoring.py computes pass@k and keeps the resumable results file; run.py drives a run and
__main__.py is the command line. docs/eval.md is the user's guide.
"""
