"""sevemu.cli"""
