"""The search workload's corpus: docstrings of the Python standard library installed on this
machine (read with `ast`, nothing imported), ranked with BM25 (`bm25s`). Duck-types
`search_service.Corpus` (`documents`, `search`), so `SearchServer` serves it as is."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Any

from conveyor.bench.search_service import Document

STDLIB_PACKAGES = (
    "json",
    "sqlite3",
    "http",
    "email",
    "asyncio",
    "collections",
    "concurrent",
    "logging",
    "urllib",
    "xml",
    "zipfile",
    "importlib",
    "unittest",
    "multiprocessing",
    "pathlib",
)
MIN_CHARS = 40


def stdlib_documents(limit: int = 0) -> list[Document]:
    """Module, class and function docstrings of the standard library (first `limit` if > 0)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py")) + sorted(
        p for name in STDLIB_PACKAGES for p in (root / name).rglob("*.py") if "test" not in p.parts
    )
    documents: list[Document] = []
    for path in files:
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        documents += _docstrings(path, module)
        if limit and len(documents) >= limit:
            return documents[:limit]
    return documents


def _docstrings(path: Path, module: str) -> list[Document]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    found = [(module, ast.get_docstring(tree))]
    for node in tree.body:
        if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        ) and not node.name.startswith("_"):
            found.append((f"{module}.{node.name}", ast.get_docstring(node)))
            if isinstance(node, ast.ClassDef):
                found += [
                    (f"{module}.{node.name}.{m.name}", ast.get_docstring(m))
                    for m in node.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_")
                ]
    return [Document(name, name, doc) for name, doc in found if doc and len(doc) >= MIN_CHARS]


class Bm25Corpus:
    """Documents ranked with BM25 over their name and text."""

    def __init__(self, documents: list[Document]) -> None:
        import bm25s

        if not documents:
            raise ValueError("the corpus is empty")
        self.documents = {d.id: d for d in documents}
        self._ids = list(self.documents)
        texts = [f"{d.title.replace('.', ' ')} {d.text}" for d in self.documents.values()]
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self._bm25s = bm25s

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """The best `k` documents, best first."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return []
        k = min(k, len(self._ids))
        indices, scores = self._retriever.retrieve(tokens, k=k, show_progress=False)
        hits = []
        for index, score in zip(indices[0], scores[0]):
            if score > 0:
                doc = self.documents[self._ids[int(index)]]
                hits.append(
                    {
                        "id": doc.id,
                        "title": doc.title,
                        "snippet": doc.text[:160],
                        "score": round(float(score), 4),
                        "url": f"/docs/{doc.id}",
                    }
                )
        return hits
