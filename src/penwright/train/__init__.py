"""Stage ``train``: Lightning finetuning of GPT-2 on the prepared tokens (``stage.train``)."""
