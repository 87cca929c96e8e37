"""Conversation templates: a registry of small data tables and the one renderer that uses them."""

from lvlm_tune.templates.registry import TEMPLATES, Template, get_template, template_names
from lvlm_tune.templates.render import Rendered, Span, render

__all__ = ["TEMPLATES", "Rendered", "Span", "Template", "get_template", "render", "template_names"]
