"""A LangChain chain on the embedded default model: prompt | ChatVLLM | StrOutputParser, streamed to the terminal.

ChatVLLM runs in this process on kvloom's shared engine (SmolLM2-135M-Instruct by default); `.stream`
prints tokens as they are decoded, `.batch` sends its inputs to the engine together.
"""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from kvloom.integrations.langchain import ChatVLLM

chat = ChatVLLM(temperature=0, max_new_tokens=40)
prompt = ChatPromptTemplate.from_messages(
    [("system", "You answer in one short sentence."), ("user", "What is the capital of {country}?")]
)
chain = prompt | chat | StrOutputParser()

for piece in chain.stream({"country": "France"}):
    print(piece, end="", flush=True)
print()

for country, answer in zip(["Italy", "Japan"], chain.batch([{"country": "Italy"}, {"country": "Japan"}])):
    print(f"{country}: {answer.strip()}")
