"""python -m moe_jax.harness_tasks: regenerate pydoc_next.jsonl from this interpreter's
pydoc_data.topics."""
import pydoc_data.topics

from moe_jax import harness_tasks

if __name__ == "__main__":
  docs = harness_tasks.pydoc_next_docs(pydoc_data.topics.topics)
  harness_tasks.write_jsonl(docs, harness_tasks.PYDOC_NEXT)
  print(f"{harness_tasks.PYDOC_NEXT}: {len(docs)} docs")
