"""Explained forecasts: facts from the data, teachers that write five-stage rationales, rationale datasets,
and the checker that tests an explanation's claims against the data."""
from stllm.distill.checker import Claim, Report, check_explanation
from stllm.distill.dataset import distill, load_rationales, save_rationales
from stllm.distill.facts import Effect, Facts, FutureFacts, compute_facts, estimate_effects, future_facts
from stllm.distill.teachers import (FORECAST_SLOT, AnalyticTeacher, HFChatTeacher, OpenAITeacher, Rationale, Teacher,
                                    TeacherError, fill_forecast, format_forecast, render_node_prompt,
                                    render_rationale)

__all__ = ["AnalyticTeacher", "Claim", "Effect", "FORECAST_SLOT", "Facts", "FutureFacts", "HFChatTeacher",
           "OpenAITeacher", "Rationale", "Report", "Teacher", "TeacherError", "check_explanation", "compute_facts",
           "distill", "estimate_effects", "fill_forecast", "format_forecast", "future_facts", "load_rationales",
           "render_node_prompt", "render_rationale", "save_rationales"]
