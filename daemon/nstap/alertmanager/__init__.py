"""Alertmanager: its alerts turned into captures, whether pushed to the webhook or pulled from every member."""
