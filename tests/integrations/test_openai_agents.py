"""The OpenAI Agents SDK on a spawned kvloom endpoint: a function tool is called and its result answers."""

from __future__ import annotations

import asyncio

import pytest

agents = pytest.importorskip("agents")

import kvloom  # noqa: E402


@pytest.mark.slow
def test_agent_calls_a_function_tool_on_the_default_model():
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"Sunny, 22 degrees Celsius in {city}"

    async def run(base_url: str):
        client = AsyncOpenAI(base_url=base_url, api_key="unused")
        model_id = (await client.models.list()).data[0].id
        agent = agents.Agent(
            name="weather",
            instructions="You answer questions about the weather.",
            tools=[get_weather],
            model=agents.OpenAIChatCompletionsModel(model=model_id, openai_client=client),
            # The 135M default model rarely chooses a tool by itself: the first turn requires one, and
            # the SDK resets tool_choice to auto once a tool has run (reset_tool_choice).
            model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
        )
        return await agents.Runner.run(agent, "What's the weather like in Paris right now?", max_turns=4)

    with kvloom.serve(max_model_len=2048) as server:
        result = asyncio.run(run(server.base_url))
    assert calls == ["Paris"]
    assert "22 degrees" in result.final_output
