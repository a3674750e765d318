"""What is wrong with a configuration, each problem as 'path: message'.

Pydantic's errors (:func:`format_error`) and the names that point nowhere
(:func:`reference_problems`), which :class:`dicom_node.config.ConfigError`
lists together. Imported by :mod:`dicom_node.config`, this module imports from
it only when a check runs.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from pydantic_core import ErrorDetails


def format_error(error: ErrorDetails) -> list[str]:
    """The problems of one pydantic error: one, or those a model-level check joined."""
    loc = list(error["loc"])
    if error["type"] == "config_key":  # a model-level check that names one key of its model
        loc.append(error.get("ctx", {})["key"])
    path = ".".join(str(part) for part in loc)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    if error["type"] in ("path_not_file", "path_not_directory"):
        message = f"{message}: {error.get('input')}"  # which one: the file to look for
    if error["type"] == "too_short" and path.endswith(".token"):
        # "Value should have at least 16 items after validation, not 5": pydantic's words
        message = f"at least {error.get('ctx', {}).get('min_length', 16)} characters"
    given = error.get("input")
    if error["type"] == "string_type" and isinstance(given, int | float):
        # ae_title: 1234, or a host written as a number: YAML reads it as one
        message = f'{message} (YAML reads {given!r} as a number: quote it, "{given}")'
    if error["type"] == "ip_any_network" and isinstance(given, str):
        message += _host_bits_hint(given)
    if error["type"] == "value_error" and not path:
        # model-level checks already carry their own paths, one problem per line
        return [part.removeprefix("Value error, ") for part in message.split("\n")]
    message = message.removeprefix("Value error, ")
    if error["type"] == "value_error" and message.startswith("."):
        # one problem per line, each under a key of the value at ``path`` (Route.when)
        return [f"{path}{line}" for line in message.split("\n")]
    return [f"{path or '(top level)'}: {message}"]


def _host_bits_hint(text: str) -> str:
    """For a network written with host bits (``10.1.2.3/8``): the network meant."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return ""
    return f" ({text} has host bits set; the network is {network})"


def reference_problems(data: dict[str, Any]) -> list[str]:
    """Names that point nowhere: pipelines, destinations, duplicate route names.

    Works on the raw mapping too, so that these are reported together with any
    field errors (pydantic skips model-level checks when a field is invalid).
    A route may name a model package under ``analysis.models_path``; its
    ``model.yaml`` is validated here too (YAML only, no torch).
    """
    from dicom_node.analysis.packages import package_problems
    from dicom_node.analysis.pipelines import PIPELINE_NAMES, known_pipelines
    from dicom_node.config import SOURCE_DESTINATION

    models_path = _models_path(data)
    pipelines = known_pipelines(models_path)
    destinations = data.get("destinations")
    destinations = destinations if isinstance(destinations, dict) else {}
    routes = data.get("routes")
    routes = [r for r in routes if isinstance(r, dict)] if isinstance(routes, list) else []
    problems = []
    if SOURCE_DESTINATION in destinations:
        problems.append(f"destinations.{SOURCE_DESTINATION}: the name is reserved")
    names = [route.get("name") for route in routes]
    for index, route in enumerate(routes):
        if route.get("name") is not None and names.count(route.get("name")) > 1:
            problems.append(f"routes.{index}.name: {route.get('name')!r} is used twice")
        pipeline = route.get("pipeline")
        if isinstance(pipeline, str) and pipeline not in pipelines:
            known = ", ".join(pipelines)
            problems.append(
                f"routes.{index}.pipeline: unknown pipeline {pipeline!r} (known: {known}; "
                f"model packages are looked for in {models_path})"
            )
        elif isinstance(pipeline, str) and pipeline not in PIPELINE_NAMES:
            problems += [
                f"routes.{index}.pipeline: package {pipeline!r}: {problem}"
                for problem in package_problems(models_path, pipeline)
            ]
        send_to = route.get("send_to")
        for name in send_to if isinstance(send_to, list) else []:
            if name != SOURCE_DESTINATION and name not in destinations:
                problems.append(f"routes.{index}.send_to: unknown destination {name!r}")
    return problems


def _models_path(data: dict[str, Any]) -> Path:
    """``analysis.models_path`` of a raw mapping, or its default."""
    from dicom_node.config import AnalysisSection

    analysis = data.get("analysis")
    value = analysis.get("models_path") if isinstance(analysis, dict) else None
    if isinstance(value, str | os.PathLike):
        return Path(value)
    return Path(AnalysisSection.model_fields["models_path"].default)
