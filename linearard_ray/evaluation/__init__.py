"""Evaluation: teacher against RoPE-scaled against restored student (perplexity, relation KL, long
context, passkey), statistics, report and plots."""
