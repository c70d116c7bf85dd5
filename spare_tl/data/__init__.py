"""Knowledge-conflict data: the schema, built-in and hub datasets, prompts and scoring."""
