"""sevemu._util"""
