"""Calling other models: the rate-limited OpenAI-compatible endpoint client (client, limiter, types),
teachers that answer prompts, judges that compare answers, the response journal that makes those
calls resumable, and the quality gates teacher answers must pass. May import data/ and storage/;
never stages/ or runtime/.
"""
