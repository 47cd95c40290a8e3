"""Stage ``prepare``: a corpus -> a tokenizer and train/val token memmaps (``stage.prepare``)."""
