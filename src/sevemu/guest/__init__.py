"""sevemu.guest"""
