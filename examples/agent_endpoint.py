"""An agent talking to a spawned endpoint: kvloom.serve() the shared engine, drive it with the openai client.

The OpenAI-compatible server runs on a background thread of this process, over the same engine (one
copy of the weights, one KV cache) that the rest of the application uses; here a LangChain model
answers on the main thread while the "agent" thread holds a two-turn conversation over HTTP.
"""

import threading

import openai

import kvloom
from kvloom.integrations.langchain import ChatVLLM

server = kvloom.serve()  # the default model on 127.0.0.1, on a free port


def agent() -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for follow_up in ["What about Germany?", None]:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=40, temperature=0, stream=True
        )
        reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        print(f"[agent] {messages[-1]['content']} -> {reply.strip()}")
        if follow_up:
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]


thread = threading.Thread(target=agent)
thread.start()
chat = ChatVLLM(temperature=0, max_new_tokens=24)  # the same engine as the server's
print(f"[main] {chat.invoke('Name a primary color.').content.strip()}")
thread.join()
server.stop()
