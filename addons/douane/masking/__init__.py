"""PII and secret masking with Presidio: in prompts, answers, tool results and streams."""
