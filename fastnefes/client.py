"""A small Python client of the refinement service (`fastnefes serve`), on httpx.

    from fastnefes.client import Client
    with Client("http://127.0.0.1:8000") as client:
        answer = client.refine(image, K, init_c2w, name="seq-01/frame-000000.color.png")
        answer.c2w, answer.status, answer.data["timings"]

Images are sent as PNG (lossless: the server refines exactly these pixels), or as the given
PNG/JPEG bytes. Poses go both ways as camera-to-world [4, 4] here and in the pose-file
convention on the wire (fastnefes.serve.wire).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.serve.wire import camera_to_wire, encode_png, pose_from_wire, pose_to_wire


class ServerError(FastnefesError):
    """The server refused a query (4xx) or failed on it (5xx)."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(f"server answered {status}: {message}")
        self.status, self.field = status, field


@dataclass
class Answer:
    name: Optional[str]
    c2w: np.ndarray  # [4, 4] refined camera-to-world
    initial_c2w: np.ndarray  # [4, 4]
    status: str
    data: dict[str, Any]  # the whole JSON answer (diagnostics, timings, ...)


@dataclass
class Query:
    image: np.ndarray | bytes  # uint8 RGB [H, W, 3], or PNG/JPEG bytes
    K: np.ndarray  # [3, 3] at the image's resolution
    c2w: np.ndarray  # [4, 4] initial camera-to-world
    name: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # (width, height); required when image is bytes
    settings: Optional[dict] = None


class Client:
    def __init__(self, url: str, timeout: float = 600.0, connections: int = 16):
        from fastnefes.serve import require_extra

        require_extra("httpx")
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str) -> dict:
        import httpx

        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise FastnefesError(f"{self.url}{path}: no answer ({type(exc).__name__}: {exc})") from None
        return self._json(response)

    @staticmethod
    def _json(response) -> dict:
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text.strip()[:200]}
        if response.status_code >= 400:
            raise ServerError(response.status_code, data.get("error", str(data)), data.get("field"))
        return data

    def health(self) -> dict:
        return self._get("/health")

    def info(self) -> dict:
        return self._get("/info")

    def refine_raw(self, image: bytes, query: dict) -> dict:
        """POST /refine with an encoded image and the query JSON as given; the JSON answer."""
        import httpx

        try:
            response = self._http.post("/refine", files={"image": ("query.png", image, "application/octet-stream")},
                                       data={"query": json.dumps(query)})
        except httpx.HTTPError as exc:
            raise FastnefesError(f"{self.url}/refine: no answer ({type(exc).__name__}: {exc})") from None
        return self._json(response)

    def refine(self, image: np.ndarray | bytes, K: np.ndarray, c2w: np.ndarray, name: Optional[str] = None,
               settings: Optional[dict] = None, size: Optional[tuple[int, int]] = None) -> Answer:
        """Refine one query; raises ServerError when the server refuses it."""
        return self.refine_query(Query(image, K, c2w, name, size, settings))

    def refine_query(self, query: Query) -> Answer:
        if isinstance(query.image, (bytes, bytearray)):
            if query.size is None:
                raise ValueError("an encoded image needs size=(width, height)")
            data, (width, height) = bytes(query.image), query.size
        else:
            data, (height, width) = encode_png(query.image), np.asarray(query.image).shape[:2]
        body = {"name": query.name, "camera": camera_to_wire(query.K, width, height), "pose": pose_to_wire(query.c2w)}
        if query.settings:
            body["settings"] = query.settings
        out = self.refine_raw(data, body)
        return Answer(out.get("name"), pose_from_wire(out["pose"]), pose_from_wire(out["initial_pose"]), out["status"], out)

    def refine_many(self, queries: Sequence[Query], concurrency: int = 8,
                    on_answer: Optional[Callable[[int, Answer], None]] = None) -> list[Answer]:
        """Refine queries with up to `concurrency` requests in flight (so the server can batch
        them); answers in the queries' order. The first refused query raises (ServerError)."""
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            futures = {pool.submit(self.refine_query, q): i for i, q in enumerate(queries)}
            answers: dict[int, Answer] = {}
            try:
                for future in as_completed(futures):
                    answers[futures[future]] = future.result()
                    if on_answer:
                        on_answer(futures[future], answers[futures[future]])
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return [answers[i] for i in range(len(queries))]
