"""sevemu.amd"""
