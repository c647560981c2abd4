"""An LCEL chain whose chat model answers with kem's edits applied, on the embedded defaults.

    .venv/bin/python examples/langchain_chain.py

Any LangChain chat model works in place of ``KemChatModel`` (``ChatOpenAI(base_url=...)`` pointed at
vLLM, for instance); or point ``ChatOpenAI`` at ``kem serve`` and skip ``with_edits`` altogether.
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from kem import Edit, KnowledgeEditor
from kem.adapters.langchain import EditRetriever, KemChatModel, with_edits


def main() -> None:
    ke = KnowledgeEditor.in_memory()
    ke.add(Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new="Alice Zhang"))

    model = KemChatModel(generator=ke.generator, max_tokens=16)  # the embedded SmolLM2
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in one sentence."), ("user", "{question}")])
    chain = prompt | with_edits(model, ke) | StrOutputParser()

    for q in ("Who is the CEO of Kem Corporation?", "What is the capital of Japan?"):
        print(f"Q: {q}\nA: {chain.invoke({'question': q})}")
    print("streamed:", "".join(chain.stream({"question": "Who is the CEO of Kem Corporation?"})))

    docs = EditRetriever(editor=ke, k=2).invoke("Who runs Kem Corporation?")
    print("retrieved:", [(d.page_content, round(d.metadata["score"], 2)) for d in docs])


if __name__ == "__main__":
    main()
