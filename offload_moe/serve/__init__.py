"""The OpenAI-compatible server: the request logic over the batch scheduler (`service`) and the HTTP app."""
