"""The public APIs (gRPC servicer, OpenAI HTTP app) and their gates."""
