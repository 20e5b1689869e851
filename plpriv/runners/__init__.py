"""Orchestration that trains many models (like the CLI, may import modules / callbacks / data)."""

from plpriv.runners.audit import AuditConfig, AuditFailed, CraftingConfig, build_parser, main, run_audit

__all__ = ["AuditConfig", "AuditFailed", "CraftingConfig", "build_parser", "main", "run_audit"]
