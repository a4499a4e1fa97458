"""FastAPI dependencies for the registry-backed stores, opened once per API-server process."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from model.registry import Registry, open_registry
from service.finetune.feedback_store import FeedbackStore
from service.finetune.jobs import JobStore
from service.settings import Settings, settings_of


def get_settings(request: Request) -> Settings:
    return settings_of(request.app)


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_registry(settings: SettingsDep) -> Registry:
    return open_registry(settings.registry)


RegistryDep = Annotated[Registry, Depends(get_registry)]


def get_jobs(registry: RegistryDep) -> JobStore:
    return JobStore(registry)


def get_feedback_store(registry: RegistryDep, settings: SettingsDep) -> FeedbackStore:
    return FeedbackStore(registry, settings.feedback_max_samples, settings.feedback_max_bytes)


JobsDep = Annotated[JobStore, Depends(get_jobs)]
FeedbackStoreDep = Annotated[FeedbackStore, Depends(get_feedback_store)]
