"""What the tests, the grader and the benchmarks share: the fake OpenAI-compatible LLM, a real
uvicorn server and WebSocket client, a throwaway redis-server, the notebook runner.

Kept apart from tests/ and grading/ so that neither imports the other.
"""
