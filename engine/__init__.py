"""Model execution: a Llama-family model in plain torch over a paged KV cache."""
