"""An agent talking to a spawned endpoint: kvloom.serve() the shared engine, drive it with the openai client.

The OpenAI-compatible server runs on a background thread of this process, over the same engine (one
copy of the weights, one KV cache) that the rest of the application uses; here a LangChain model
answers on the main thread while the "agent" thread holds a conversation over HTTP and calls a tool.
"""

import json
import threading

import openai

import kvloom
from kvloom.integrations.langchain import ChatVLLM

server = kvloom.serve(max_model_len=2048)  # the default model on 127.0.0.1, on a free port

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def get_weather(city: str) -> str:
    return f"Sunny, 22 degrees Celsius in {city}"


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

    # A tool loop. The 135M default model seldom chooses a tool by itself, so the first turn requires
    # one (the grammar makes the call valid); the next turn, with the result, is the model's choice.
    messages = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    first = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64
    )
    call = first.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    result = get_weather(**arguments)
    print(f"[agent] tool call: {call.function.name}({json.dumps(arguments)}) -> {result}")
    messages += [first.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=64)
    print(f"[agent] answer: {final.choices[0].message.content.strip()}")


thread = threading.Thread(target=agent)
thread.start()
chat = ChatVLLM(temperature=0, max_new_tokens=24, vllm_kwargs={"max_model_len": 2048})  # the server's engine
print(f"[main] {chat.invoke('Name a primary color.').content.strip()}")
thread.join()
server.stop()
