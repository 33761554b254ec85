"""The fault suite: worker replicas under SIGKILLs and service restarts, checked against an
independent model of the stream they consumed (docs/reliability.md)."""
