from alexnet_pipe.cli import main

main(prog_name="alexnet-pipe")
