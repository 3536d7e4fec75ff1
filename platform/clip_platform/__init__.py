"""The platform layer: Ray Data sources and stages (`data`), Ray Train +
DeepSpeed finetuning (`train`), batch jobs (`batch`), shared helpers."""
